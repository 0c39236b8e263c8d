//! Several gateways as one (cargo feature `redis`).
//!
//! Where users outgrow one gateway they run several behind an L4 balancer, which sends each turn
//! of a conversation to any of them. Pins ([`pins::RedisPinTable`](crate::pins)) and quotas
//! ([`store::RedisStore`](crate::store)) are shared through Redis already; what each gateway
//! counts of the replicas' work is not: with N gateways each sees about 1/N of it, and all send to
//! whatever looks idle to them.
//!
//! [`WorkView`] shares that count: every gateway publishes, per replica, the work it has
//! outstanding (prefill tokens and requests, decode requests and tokens) to one Redis hash on a
//! short period, off the request path, and reads back the others' figures in the same round
//! trip; their sum lands in each replica's
//! [`WorkState::foreign`](crate::load::work::WorkState::foreign), which the predicted-TTFT model
//! adds to the gateway's own exact counts. A gateway that stops publishing drops out after the
//! view's time to live; when Redis is down the figures age past
//! [`TtftModel::shared_max_age`](crate::load::TtftModel::shared_max_age) and each gateway falls
//! back to its own counts plus the engines' load reports.
//!
//! [`PrefixShare`] does the same for the prefix index keyless placement reads: each gateway's
//! placements (which prompt prefixes went to which replica) go to one Redis stream each period
//! and are recorded in every other gateway's index, so a keyless request finds its cache from
//! any gateway.

mod prefix_share;
mod work_view;

pub use self::prefix_share::{
    PrefixShare, PrefixShareConfig, PrefixShareStats, PREFIX_SHARE_ERRORS_COUNTER,
    PREFIX_SHARE_RECEIVED_COUNTER, PREFIX_SHARE_SENT_COUNTER,
};
pub use self::work_view::{
    WorkView, WorkViewConfig, WorkViewStats, WORK_VIEW_AGE_GAUGE, WORK_VIEW_ERRORS_COUNTER,
    WORK_VIEW_GATEWAYS_GAUGE,
};
