//! The route context the simulation gives each request: the one place to extend when the
//! layers learn to read more from a request.

use replica_router::context::RouteContext;

/// What the simulation knows about a request when it builds its [`RouteContext`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct TurnInfo<'a> {
    /// The session key (`s<id>`).
    pub session: &'a str,
    /// The user key (`u<id>`).
    pub user: &'a str,
    /// Chain hashes of the prompt's full blocks (of `block_size` tokens each).
    #[allow(dead_code)]
    pub blocks: &'a [u64],
    /// Tokens per block.
    #[allow(dead_code)]
    pub block_size: u32,
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Answer tokens the request will generate.
    pub answer_tokens: u32,
}

/// The route context of one request: its session and user keys unless `keyless` (then only
/// what the request's content says reaches the router), and its estimated tokens.
pub(crate) fn route_context(turn: &TurnInfo<'_>, keyless: bool) -> RouteContext {
    let (session, user) = if keyless {
        (None, None)
    } else {
        (
            Some(turn.session.to_owned().into()),
            Some(turn.user.to_owned().into()),
        )
    };
    RouteContext {
        session,
        user,
        estimated_tokens: u64::from(turn.prompt_tokens) + u64::from(turn.answer_tokens),
        ..RouteContext::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyless_requests_carry_no_key() {
        let turn = TurnInfo {
            session: "s1",
            user: "u2",
            blocks: &[1, 2, 3],
            block_size: 16,
            prompt_tokens: 50,
            answer_tokens: 10,
        };
        let keyed = route_context(&turn, false);
        assert_eq!(keyed.session.unwrap().as_bytes(), b"s1");
        assert_eq!(keyed.user.unwrap().as_bytes(), b"u2");
        let keyless = route_context(&turn, true);
        assert!(keyless.session.is_none() && keyless.user.is_none() && keyless.tenant.is_none());
        assert_eq!(keyless.estimated_tokens, 60);
    }
}
