//! Errors from building a [`Select`](crate::select::Select).

/// Why a [`SelectBuilder`](crate::select::SelectBuilder) refused its routes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SelectConfigError {
    /// No route was added.
    #[error("a select router needs at least one route")]
    NoRoutes,
    /// Two routes share a name.
    #[error("duplicate route name {0:?}")]
    DuplicateRoute(String),
    /// A route name is empty or longer than
    /// [`MAX_ROUTE_NAME_LEN`](crate::select::MAX_ROUTE_NAME_LEN) bytes.
    #[error("invalid route name {0:?}")]
    InvalidName(String),
    /// The default route is not one of the routes.
    #[error("the default route {0:?} is not a route")]
    UnknownDefault(String),
}
