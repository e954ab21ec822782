//! The connection to the operator API: TLS trusting exactly the configured
//! certificate, the operator token on every call, and errors that read as
//! one line.

use std::time::Duration;

use anyhow::{bail, Context as _};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

use crate::config::Resolved;
use proto::control_api_client::ControlApiClient;

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct Auth(MetadataValue<Ascii>);

impl tonic::service::Interceptor for Auth {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

pub type Api = ControlApiClient<InterceptedService<Channel, Auth>>;

pub async fn connect(config: &Resolved) -> anyhow::Result<Api> {
    let url = config.url.trim_end_matches('/');
    if !url.starts_with("https://") {
        bail!("control plane URL `{url}` must start with https:// (the control plane only speaks TLS)");
    }
    let mut auth: MetadataValue<Ascii> = format!("Bearer {}", config.token.trim())
        .parse()
        .map_err(|_| {
            anyhow::anyhow!("the operator token holds characters not allowed in a header")
        })?;
    auth.set_sensitive(true);
    let endpoint = Channel::from_shared(url.to_owned())
        .map_err(|err| anyhow::anyhow!("control plane URL `{url}`: {err}"))?
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&config.ca_pem)))
        .context("TLS settings")?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    let channel = endpoint.connect().await.map_err(|err| {
        anyhow::anyhow!("cannot reach the control plane at {url}: {}", chain(&err))
    })?;
    Ok(ControlApiClient::with_interceptor(channel, Auth(auth)))
}

/// An error and its sources on one line, without repeats.
fn chain(err: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = vec![err.to_string()];
    let mut source = err.source();
    while let Some(next) = source {
        let text = next.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = next.source();
    }
    parts.join(": ")
}

/// A failed call as one line: the control plane's message, which names the
/// thing, plus what kind of failure it was when that helps.
pub fn status_error(status: tonic::Status) -> anyhow::Error {
    use tonic::Code;
    let message = status.message().to_owned();
    match status.code() {
        Code::Unauthenticated => anyhow::anyhow!("not authorised: {message}"),
        Code::PermissionDenied => anyhow::anyhow!("permission denied: {message}"),
        Code::Unavailable => {
            let source = std::error::Error::source(&status)
                .map(|s| format!(" ({})", chain(s)))
                .unwrap_or_default();
            anyhow::anyhow!("control plane unavailable: {message}{source}")
        }
        _ if message.is_empty() => anyhow::anyhow!("call failed: {:?}", status.code()),
        _ => anyhow::anyhow!("{message}"),
    }
}
