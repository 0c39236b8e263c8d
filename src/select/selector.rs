//! Selectors: which route a request takes.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use http::HeaderName;

use crate::context::Priority;
use crate::error::RouteError;
use crate::request::RouteRequest;

/// Longest model or route name a selector accepts from a request, in bytes.
pub const MAX_ROUTE_NAME_LEN: usize = 256;

/// Chooses the route of a request.
///
/// `Ok(Some(name))` sends the request to the route called `name` (a name no route has fails with
/// [`RouteError::NoRoute`], HTTP 404); `Ok(None)` sends it to the default route (or fails with
/// `NoRoute` when there is none); `Err` rejects it as is. Selectors only look at the request:
/// they must be cheap and never block.
///
/// Implemented by [`ByPath`], [`ByModel`], [`ByPriority`], pairs `(a, b)` (the first that names a
/// route wins), and closures `Fn(&Req) -> Option<R>` where `R: AsRef<str>` (`&'static str`,
/// `String`, ...). A closure's name is copied once per request; implement the trait on a type to
/// return names borrowed from it or from the request instead.
pub trait Selector<Req> {
    /// The route for `req`.
    fn select<'a>(&'a self, req: &'a Req) -> Result<Option<Cow<'a, str>>, RouteError>;
}

impl<Req, F, R> Selector<Req> for F
where
    F: Fn(&Req) -> Option<R>,
    R: AsRef<str>,
{
    fn select<'a>(&'a self, req: &'a Req) -> Result<Option<Cow<'a, str>>, RouteError> {
        // `R` may borrow the request only for the call; copy the name out.
        Ok(self(req).map(|r| Cow::Owned(r.as_ref().to_owned())))
    }
}

/// Tries `A`, then `B` when `A` names no route. Errors from `A` are returned at once.
impl<Req, A, B> Selector<Req> for (A, B)
where
    A: Selector<Req>,
    B: Selector<Req>,
{
    fn select<'a>(&'a self, req: &'a Req) -> Result<Option<Cow<'a, str>>, RouteError> {
        match self.0.select(req)? {
            Some(name) => Ok(Some(name)),
            None => self.1.select(req),
        }
    }
}

/// Routes by the longest matching path prefix, on path-segment boundaries: `/v1/embeddings`
/// matches `/v1/embeddings` and `/v1/embeddings/x`, not `/v1/embeddingsx`. A prefix that ends
/// with `/` matches anything under it. No match: the default route.
///
/// ```
/// use replica_router::select::{ByPath, Selector};
/// let by_path = ByPath::new()
///     .prefix("/v1/embeddings", "embeddings")
///     .prefix("/v1", "chat");
/// let req = |p: &str| http::Request::builder().uri(p).body(()).unwrap();
/// assert_eq!(by_path.select(&req("/v1/embeddings")).unwrap().as_deref(), Some("embeddings"));
/// assert_eq!(by_path.select(&req("/v1/chat/completions")).unwrap().as_deref(), Some("chat"));
/// assert_eq!(by_path.select(&req("/v1x")).unwrap(), None);
/// ```
#[derive(Debug, Clone, Default)]
pub struct ByPath {
    /// Longest prefix first.
    prefixes: Vec<(String, Arc<str>)>,
}

impl ByPath {
    /// No prefixes yet.
    pub fn new() -> Self {
        ByPath::default()
    }

    /// Sends paths under `prefix` to `route`. A later call with the same prefix replaces it.
    pub fn prefix(mut self, prefix: impl Into<String>, route: impl AsRef<str>) -> Self {
        let prefix = prefix.into();
        self.prefixes.retain(|(p, _)| p != &prefix);
        self.prefixes.push((prefix, Arc::from(route.as_ref())));
        self.prefixes
            .sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        self
    }

    /// The route for a path, by the longest matching prefix.
    pub fn route_for(&self, path: &str) -> Option<&str> {
        self.prefixes
            .iter()
            .find(|(p, _)| path_has_prefix(path, p))
            .map(|(_, r)| &**r)
    }
}

fn path_has_prefix(path: &str, prefix: &str) -> bool {
    path.starts_with(prefix)
        && (path.len() == prefix.len()
            || prefix.ends_with('/')
            || path.as_bytes()[prefix.len()] == b'/')
}

impl<B> Selector<http::Request<B>> for ByPath {
    fn select<'a>(&'a self, req: &'a http::Request<B>) -> Result<Option<Cow<'a, str>>, RouteError> {
        Ok(self.route_for(req.uri().path()).map(Cow::Borrowed))
    }
}

/// The model a request asks for, put in its extensions by the application (for example after
/// it parsed the JSON body's `"model"` field). [`ByModel`] reads it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ModelName(Arc<str>);

impl ModelName {
    /// A model name.
    pub fn new(name: impl AsRef<str>) -> Self {
        ModelName(Arc::from(name.as_ref()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Routes by model name: the [`ModelName`] in the request's extensions, else (when configured)
/// a header; through an alias table (several model names served by one pool) or, unaliased, to
/// the route with the model's own name. A request that names no model takes the default route;
/// one that names a model no route serves fails with [`RouteError::NoRoute`] (404). A header
/// that is not UTF-8, or a name longer than [`MAX_ROUTE_NAME_LEN`], fails with
/// [`RouteError::InvalidRequest`] (400).
///
/// This is the guide's *tiered pools*: a small model's DP pool for cheap queries and a large
/// model's pool for escalations, chosen per request by model name.
///
/// ```
/// use replica_router::select::{ByModel, ModelName, Selector};
/// let by_model = ByModel::new()
///     .header(http::HeaderName::from_static("x-model"))
///     .alias("llama-3-8b-instruct", "small")
///     .alias("llama-3-70b-instruct", "large");
/// let mut req = http::Request::builder().header("x-model", "llama-3-8b-instruct").body(()).unwrap();
/// assert_eq!(by_model.select(&req).unwrap().as_deref(), Some("small"));
/// req.extensions_mut().insert(ModelName::new("llama-3-70b-instruct")); // wins over the header
/// assert_eq!(by_model.select(&req).unwrap().as_deref(), Some("large"));
/// let none = http::Request::new(());
/// assert_eq!(by_model.select(&none).unwrap(), None); // default route
/// ```
#[derive(Debug, Clone, Default)]
pub struct ByModel {
    header: Option<HeaderName>,
    aliases: HashMap<String, Arc<str>>,
}

impl ByModel {
    /// Reads the [`ModelName`] extension only; no aliases.
    pub fn new() -> Self {
        ByModel::default()
    }

    /// Also reads the model from this header when the extension is absent.
    pub fn header(mut self, name: HeaderName) -> Self {
        self.header = Some(name);
        self
    }

    /// Serves `model` from `route`.
    pub fn alias(mut self, model: impl Into<String>, route: impl AsRef<str>) -> Self {
        self.aliases.insert(model.into(), Arc::from(route.as_ref()));
        self
    }

    fn resolve<'a>(&'a self, model: &'a str) -> Result<Cow<'a, str>, RouteError> {
        if model.len() > MAX_ROUTE_NAME_LEN {
            return Err(RouteError::InvalidRequest(format!(
                "model name longer than {MAX_ROUTE_NAME_LEN} bytes"
            )));
        }
        Ok(match self.aliases.get(model) {
            Some(route) => Cow::Borrowed(&**route),
            None => Cow::Borrowed(model),
        })
    }
}

impl<B> Selector<http::Request<B>> for ByModel {
    fn select<'a>(&'a self, req: &'a http::Request<B>) -> Result<Option<Cow<'a, str>>, RouteError> {
        if let Some(m) = req.extensions().get::<ModelName>() {
            return self.resolve(m.as_str()).map(Some);
        }
        let Some(value) = self.header.as_ref().and_then(|h| req.headers().get(h)) else {
            return Ok(None);
        };
        if value.is_empty() {
            return Ok(None);
        }
        let model = value
            .to_str()
            .map_err(|_| RouteError::InvalidRequest("model header is not visible ASCII".into()))?;
        self.resolve(model.trim()).map(Some)
    }
}

/// Routes by the request's [`Priority`] (from its
/// [`RouteContext`](crate::context::RouteContext); [`Priority::Standard`] without one): for
/// example batch traffic to a separate pool, so offline jobs never take GPUs from chat.
/// Unmapped priorities take the default route.
///
/// ```
/// use replica_router::context::{Priority, RouteContext};
/// use replica_router::select::{ByPriority, Selector};
/// let by_priority = ByPriority::new().route(Priority::Batch, "batch");
/// let mut req = http::Request::new(());
/// assert_eq!(by_priority.select(&req).unwrap(), None);
/// req.extensions_mut().insert(RouteContext { priority: Priority::Batch, ..Default::default() });
/// assert_eq!(by_priority.select(&req).unwrap().as_deref(), Some("batch"));
/// ```
#[derive(Debug, Clone, Default)]
pub struct ByPriority {
    routes: [Option<Arc<str>>; 3],
}

fn priority_slot(p: Priority) -> usize {
    match p {
        Priority::Batch => 0,
        Priority::Standard => 1,
        Priority::Interactive => 2,
    }
}

impl ByPriority {
    /// No priority mapped yet.
    pub fn new() -> Self {
        ByPriority::default()
    }

    /// Sends requests of `priority` to `route`.
    pub fn route(mut self, priority: Priority, route: impl AsRef<str>) -> Self {
        self.routes[priority_slot(priority)] = Some(Arc::from(route.as_ref()));
        self
    }
}

impl<Req: RouteRequest> Selector<Req> for ByPriority {
    fn select<'a>(&'a self, req: &'a Req) -> Result<Option<Cow<'a, str>>, RouteError> {
        let p = req.route_context().map(|c| c.priority).unwrap_or_default();
        Ok(self.routes[priority_slot(p)].as_deref().map(Cow::Borrowed))
    }
}
