use std::collections::HashMap;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower::util::Oneshot;

use crate::error::RouteError;
use crate::future::RouteFuture;
use crate::select::error::SelectConfigError;
use crate::select::selector::Selector;
use crate::select::{NO_ROUTE, REQUESTS_COUNTER};

struct Routes {
    names: Vec<Arc<str>>,
    index: HashMap<Arc<str>, usize>,
    default: Option<usize>,
    counters: Vec<metrics::Counter>,
    unmatched: metrics::Counter,
}

/// Sends each request to one of several named service stacks, chosen by a [`Selector`]. See the
/// [module docs](crate::select).
///
/// Always ready: the chosen stack is cloned and readied inside the response future, so a
/// saturated or empty stack never delays requests for the others. Cloning a `Select` clones
/// each stack once (names, index and selector are shared); it is `Send` when the stacks are,
/// so `tower::util::BoxCloneService` stacks work.
pub struct Select<S, P> {
    routes: Arc<Routes>,
    services: Vec<S>,
    selector: Arc<P>,
}

impl<S: Clone, P> Clone for Select<S, P> {
    fn clone(&self) -> Self {
        Select {
            routes: self.routes.clone(),
            services: self.services.clone(),
            selector: self.selector.clone(),
        }
    }
}

impl<S, P> std::fmt::Debug for Select<S, P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Select")
            .field("routes", &self.routes.names)
            .field(
                "default",
                &self.routes.default.map(|i| &self.routes.names[i]),
            )
            .finish_non_exhaustive()
    }
}

impl<S, P> Select<S, P> {
    /// Starts building a router that chooses with `selector`.
    pub fn builder(selector: P) -> SelectBuilder<S, P> {
        SelectBuilder {
            selector,
            routes: Vec::new(),
            default: None,
        }
    }

    /// The route names, in the order they were added.
    pub fn route_names(&self) -> impl Iterator<Item = &str> {
        self.routes.names.iter().map(|n| &**n)
    }

    /// The stack of the route called `name`.
    pub fn route(&self, name: &str) -> Option<&S> {
        self.routes.index.get(name).map(|&i| &self.services[i])
    }

    /// The default route's name, if there is one.
    pub fn default_route(&self) -> Option<&str> {
        self.routes.default.map(|i| &*self.routes.names[i])
    }

    /// The selector.
    pub fn selector(&self) -> &P {
        &self.selector
    }

    /// The index of the route `req` takes.
    fn route_of<Req>(&self, req: &Req) -> Result<usize, RouteError>
    where
        P: Selector<Req>,
    {
        match self.selector.select(req)? {
            Some(name) => {
                self.routes
                    .index
                    .get(&*name)
                    .copied()
                    .ok_or_else(|| RouteError::NoRoute {
                        route: Some(crate::error::printable_key(name.as_bytes())),
                    })
            }
            None => self
                .routes
                .default
                .ok_or(RouteError::NoRoute { route: None }),
        }
    }
}

impl<S, P, Req> tower::Service<Req> for Select<S, P>
where
    S: tower::Service<Req> + Clone,
    S::Error: Into<RouteError>,
    P: Selector<Req>,
{
    type Response = S::Response;
    type Error = RouteError;
    type Future = RouteFuture<Oneshot<S, Req>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness belongs to the chosen stack and is awaited in the response future.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        match self.route_of(&req) {
            Ok(i) => {
                self.routes.counters[i].increment(1);
                RouteFuture::new(Oneshot::new(self.services[i].clone(), req))
            }
            Err(e) => {
                self.routes.unmatched.increment(1);
                RouteFuture::failed(e)
            }
        }
    }
}

/// Builds a [`Select`]; [`build`](Self::build) validates the routes.
pub struct SelectBuilder<S, P> {
    selector: P,
    routes: Vec<(String, S)>,
    default: Option<String>,
}

impl<S, P> std::fmt::Debug for SelectBuilder<S, P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SelectBuilder")
            .field(
                "routes",
                &self.routes.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .field("default", &self.default)
            .finish_non_exhaustive()
    }
}

impl<S, P> SelectBuilder<S, P> {
    /// Adds a route called `name`, served by `service` (typically a whole stack over its own
    /// pool).
    pub fn route(mut self, name: impl Into<String>, service: S) -> Self {
        self.routes.push((name.into(), service));
        self
    }

    /// The route for requests the selector names no route for.
    pub fn default_route(mut self, name: impl Into<String>) -> Self {
        self.default = Some(name.into());
        self
    }

    /// Validates and builds: at least one route, names non-empty, at most
    /// [`MAX_ROUTE_NAME_LEN`](crate::select::MAX_ROUTE_NAME_LEN) bytes and unique, and the
    /// default (if any) one of them. Registers the per-route request counters (install a
    /// metrics recorder before).
    pub fn build(self) -> Result<Select<S, P>, SelectConfigError> {
        if self.routes.is_empty() {
            return Err(SelectConfigError::NoRoutes);
        }
        let mut names: Vec<Arc<str>> = Vec::with_capacity(self.routes.len());
        let mut services = Vec::with_capacity(self.routes.len());
        let mut index = HashMap::with_capacity(self.routes.len());
        for (name, svc) in self.routes {
            if name.is_empty() || name.len() > crate::select::MAX_ROUTE_NAME_LEN {
                return Err(SelectConfigError::InvalidName(name));
            }
            let name: Arc<str> = Arc::from(name);
            if index.insert(name.clone(), names.len()).is_some() {
                return Err(SelectConfigError::DuplicateRoute(name.to_string()));
            }
            names.push(name);
            services.push(svc);
        }
        let default = match self.default {
            None => None,
            Some(d) => Some(
                *index
                    .get(d.as_str())
                    .ok_or(SelectConfigError::UnknownDefault(d))?,
            ),
        };
        let counters = names
            .iter()
            .map(|n| metrics::counter!(REQUESTS_COUNTER, "route" => n.to_string()))
            .collect();
        let unmatched = metrics::counter!(REQUESTS_COUNTER, "route" => NO_ROUTE);
        Ok(Select {
            routes: Arc::new(Routes {
                names,
                index,
                default,
                counters,
                unmatched,
            }),
            services,
            selector: Arc::new(self.selector),
        })
    }
}
