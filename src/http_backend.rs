//! HTTP replicas over a pooled keep-alive hyper client (feature `http-backend`).
//!
//! [`HttpReplica`] is a [`Backend`] and a tower `Service<http::Request<B>>` that forwards each
//! request to the replica's base URL (path and query appended), probes health with
//! `GET {base}/health`, and can read vLLM-style load from `GET {base}/metrics`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::Uri;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::backend::{Backend, BoxFuture, LoadReport};
use crate::error::BoxError;
use crate::load::prometheus::VllmParser;

/// Errors from building an [`HttpReplica`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpReplicaError {
    /// The URL does not parse, or lacks a scheme or host.
    #[error("invalid replica URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL given.
        url: String,
        /// Why it was rejected.
        reason: &'static str,
    },
}

/// A replica's base URL, validated: `http://host[:port][/prefix]`, trailing `/` removed.
///
/// ```
/// use replica_router::http_backend::BaseUrl;
/// let url = BaseUrl::parse("http://127.0.0.1:8000/v1/").unwrap();
/// assert_eq!(url.authority.as_str(), "127.0.0.1:8000");
/// assert_eq!(url.prefix, "/v1");
/// assert!(BaseUrl::parse("https://host").is_err());
/// ```
#[derive(Debug, Clone)]
pub struct BaseUrl {
    /// Always `http`.
    pub scheme: Scheme,
    /// `host[:port]`.
    pub authority: Authority,
    /// The path prefix before each request's path, without a trailing `/` (often empty).
    pub prefix: String,
}

impl BaseUrl {
    /// Parses and validates `url`.
    pub fn parse(url: &str) -> Result<BaseUrl, HttpReplicaError> {
        let bad = |reason| HttpReplicaError::InvalidUrl {
            url: url.to_string(),
            reason,
        };
        let uri: Uri = url.parse().map_err(|_| bad("does not parse as a URI"))?;
        let scheme = uri.scheme().cloned().ok_or_else(|| bad("no scheme"))?;
        if scheme != Scheme::HTTP {
            return Err(bad("only http:// is supported"));
        }
        let authority = uri.authority().cloned().ok_or_else(|| bad("no host"))?;
        let prefix = uri.path().trim_end_matches('/').to_string();
        Ok(BaseUrl {
            scheme,
            authority,
            prefix,
        })
    }
}

/// The hyper client type replicas share.
pub type HttpClient<B> = Client<HttpConnector, B>;

/// A keep-alive client suited to a gateway: `TCP_NODELAY`, idle connections kept 90 s, up to
/// `max_idle_per_host` idle connections per replica.
pub fn default_client<B>(max_idle_per_host: usize) -> HttpClient<B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_keepalive(Some(Duration::from_secs(60)));
    connector.set_connect_timeout(Some(Duration::from_secs(5)));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(max_idle_per_host)
        .build(connector)
}

/// One replica reached over HTTP/1.1.
#[derive(Debug)]
pub struct HttpReplica<B = Full<Bytes>> {
    scheme: Scheme,
    authority: Authority,
    prefix: String,
    client: HttpClient<B>,
    probe_timeout: Duration,
    load_parser: Option<Arc<VllmParser>>,
}

impl<B> Clone for HttpReplica<B> {
    fn clone(&self) -> Self {
        HttpReplica {
            scheme: self.scheme.clone(),
            authority: self.authority.clone(),
            prefix: self.prefix.clone(),
            client: self.client.clone(),
            probe_timeout: self.probe_timeout,
            load_parser: self.load_parser.clone(),
        }
    }
}

impl<B> HttpReplica<B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// A replica at `url` (`http://host:port` with an optional path prefix) using `client`
    /// (share one client among replicas: it pools connections per host).
    ///
    /// ```
    /// use replica_router::http_backend::{default_client, HttpReplica};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let client = default_client(64);
    /// let r: HttpReplica = HttpReplica::new("http://127.0.0.1:8000", client.clone()).unwrap();
    /// assert_eq!(r.base_url(), "http://127.0.0.1:8000");
    /// assert!(HttpReplica::<http_body_util::Full<bytes::Bytes>>::new("not a url", client).is_err());
    /// # }
    /// ```
    pub fn new(url: &str, client: HttpClient<B>) -> Result<Self, HttpReplicaError> {
        let BaseUrl {
            scheme,
            authority,
            prefix,
        } = BaseUrl::parse(url)?;
        Ok(HttpReplica {
            scheme,
            authority,
            prefix,
            client,
            probe_timeout: Duration::from_secs(2),
            load_parser: None,
        })
    }

    /// Reads the replica's load from vLLM's `GET {base}/metrics` with `parser` (see
    /// [`load::prometheus`](crate::load::prometheus)); without this, the replica reports no load.
    pub fn vllm_load(mut self, parser: VllmParser) -> Self {
        self.load_parser = Some(Arc::new(parser));
        self
    }

    /// How long a health probe or metrics scrape may take.
    pub fn probe_timeout(mut self, timeout: Duration) -> Self {
        self.probe_timeout = timeout;
        self
    }

    /// The base URL.
    pub fn base_url(&self) -> String {
        format!("{}://{}{}", self.scheme, self.authority, self.prefix)
    }

    /// The upstream URI for a request path.
    pub fn upstream_uri(&self, path_and_query: Option<&PathAndQuery>) -> Result<Uri, http::Error> {
        let pq = path_and_query.map_or("/", |p| p.as_str());
        let pq = if self.prefix.is_empty() {
            PathAndQuery::try_from(pq)?
        } else {
            PathAndQuery::try_from(format!("{}{}", self.prefix, pq))?
        };
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(pq)
            .build()
    }
}

/// The response future of [`HttpReplica`].
pub struct HttpResponseFuture {
    inner: Result<hyper_util::client::legacy::ResponseFuture, Option<http::Error>>,
}

impl std::fmt::Debug for HttpResponseFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HttpResponseFuture")
    }
}

impl Future for HttpResponseFuture {
    type Output = Result<http::Response<Incoming>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.inner {
            Ok(fut) => Pin::new(fut).poll(cx).map_err(Into::into),
            Err(e) => Poll::Ready(Err(e
                .take()
                .expect("replica future polled after completion")
                .into())),
        }
    }
}

impl<B> tower::Service<http::Request<B>> for HttpReplica<B>
where
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = http::Response<Incoming>;
    type Error = BoxError;
    type Future = HttpResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        match self.upstream_uri(req.uri().path_and_query()) {
            Ok(uri) => *req.uri_mut() = uri,
            Err(e) => {
                return HttpResponseFuture {
                    inner: Err(Some(e)),
                }
            }
        }
        // Let the client write the replica's own Host.
        req.headers_mut().remove(http::header::HOST);
        HttpResponseFuture {
            inner: Ok(self.client.request(req)),
        }
    }
}

impl<B> HttpReplica<B>
where
    B: http_body::Body + Default + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// `GET {base}{path}` with the probe timeout; returns the status and body.
    pub async fn get(&self, path: &'static str) -> Result<(http::StatusCode, Bytes), BoxError> {
        use http_body_util::BodyExt;
        let uri = self.upstream_uri(Some(&PathAndQuery::from_static(path)))?;
        let req = http::Request::get(uri).body(B::default())?;
        let fut = async {
            let resp = self.client.request(req).await?;
            let status = resp.status();
            let body = resp.into_body().collect().await?.to_bytes();
            Ok::<_, BoxError>((status, body))
        };
        tokio::time::timeout(self.probe_timeout, fut)
            .await
            .map_err(|_| BoxError::from("timed out"))?
    }
}

impl<B> Backend for HttpReplica<B>
where
    B: http_body::Body + Default + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    fn probe(&self) -> BoxFuture<'static, Result<(), BoxError>> {
        let this = self.clone();
        Box::pin(async move {
            let (status, _) = this.get("/health").await?;
            if status.is_success() {
                Ok(())
            } else {
                Err(format!("health probe answered {status}").into())
            }
        })
    }

    fn load_report(&self) -> BoxFuture<'static, Result<Option<LoadReport>, BoxError>> {
        let Some(parser) = self.load_parser.clone() else {
            return Box::pin(std::future::ready(Ok(None)));
        };
        let this = self.clone();
        Box::pin(async move {
            let (status, body) = this.get("/metrics").await?;
            if !status.is_success() {
                return Err(format!("metrics scrape answered {status}").into());
            }
            Ok(Some(parser.parse(&body, tokio::time::Instant::now())?))
        })
    }
}
