//! The Identity service: node certificates (bootstrap token first, then
//! the node's own certificate) and workload certificates for CSRs made on
//! the node that runs the workload.
//!
//! Authorization follows the store, never the request: a workload's
//! identity is read from its record, and only the node it is scheduled on
//! gets a certificate for it. Refusals do not say whether the workload
//! exists elsewhere.

use std::sync::Arc;

use mesh_api::v1::{
    CertificateResponse, CreateCertificateRequest, JoinNodeRequest, identity_server,
};
use mesh_identity::{CertificateAuthority, IssuedCertificate, SpiffeId, components};
use mesh_model::{Kind, Resource, names::check_dns_label};
use time::OffsetDateTime;
use tonic::{Request, Response, Status};

use super::{
    limit::{RateLimit, RateLimiter},
    tls::Peer,
};
use crate::{
    api::Identity,
    store::{NewCertificate, Store, StoreError},
};

/// The service's state.
#[derive(Debug)]
pub struct IdentityService {
    store: Store,
    identity: Arc<Identity>,
    limiter: RateLimiter,
}

impl IdentityService {
    pub fn new(store: Store, identity: Arc<Identity>, limit: RateLimit) -> Self {
        Self {
            store,
            identity,
            limiter: RateLimiter::new(limit),
        }
    }

    /// The tonic service.
    pub fn into_server(self) -> identity_server::IdentityServer<Self> {
        identity_server::IdentityServer::new(self)
    }

    fn trust_domain(&self) -> String {
        self.identity.ca().trust_domain().to_owned()
    }

    fn rate_limit(&self, node: &str) -> Result<(), Status> {
        self.limiter.take(node).map_err(|wait| {
            tracing::warn!(node, "certificate requests over the node's rate limit");
            Status::resource_exhausted(format!(
                "node {node} is over its certificate request rate; retry in {} ms",
                wait.as_millis().max(1)
            ))
        })
    }

    async fn issue(
        &self,
        csr_pem: &str,
        id: &SpiffeId,
        record_name: &str,
        node: &str,
    ) -> Result<CertificateResponse, Status> {
        let now = OffsetDateTime::now_utc();
        // One snapshot: the bundle sent is the one the certificate chains to.
        let ca = self.identity.ca();
        let cert = ca
            .issue_for_csr(csr_pem, id, now)
            .map_err(|e| Status::invalid_argument(format!("csr_pem: {e}")))?;
        self.store
            .record_certificate(&NewCertificate {
                service_name: record_name,
                spiffe_id: &id.to_string(),
                serial: &cert.serial,
                cert_pem: &cert.pem,
                sealed_key: None,
                node: Some(node),
                issued_at: now,
                expiry: cert.not_after,
            })
            .await
            .map_err(internal)?;
        tracing::info!(spiffe_id = %id, serial = %cert.serial, node, "issued a certificate for a CSR");
        Ok(response(&ca, cert))
    }
}

fn response(ca: &CertificateAuthority, cert: IssuedCertificate) -> CertificateResponse {
    CertificateResponse {
        spiffe_id: cert.spiffe_id.to_string(),
        serial: cert.serial,
        certificate_der: cert.der.to_vec(),
        chain_der: Vec::new(),
        not_before_unix: cert.not_before.unix_timestamp(),
        not_after_unix: cert.not_after.unix_timestamp(),
        trust_bundle_der: ca
            .bundle()
            .roots()
            .iter()
            .map(|root| root.to_vec())
            .collect(),
    }
}

fn internal(error: StoreError) -> Status {
    tracing::error!(error = %error, "store error while issuing");
    Status::internal("the control plane's store failed; retry later")
}

fn peer<T>(request: &Request<T>) -> Option<&Peer> {
    request.extensions().get::<Peer>()
}

/// The bearer token in the request's metadata, if any.
fn bearer<T>(request: &Request<T>) -> Option<&str> {
    request
        .metadata()
        .get(mesh_api::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

#[tonic::async_trait]
impl identity_server::Identity for IdentityService {
    async fn join_node(
        &self,
        request: Request<JoinNodeRequest>,
    ) -> Result<Response<CertificateResponse>, Status> {
        let node = request.get_ref().node.clone();
        let node_id = components::node(&self.trust_domain(), &node)
            .map_err(|why| Status::invalid_argument(format!("node: {why}")))?;
        let now = OffsetDateTime::now_utc();
        let caller = peer(&request).and_then(|p| p.identity_at(now));
        match caller {
            // Renewal: a node renews only its own certificate.
            Some(caller) if components::node_name(caller) == Some(node.as_str()) => {}
            Some(caller) => {
                return Err(Status::permission_denied(format!(
                    "{caller} may not obtain the certificate of node {node}"
                )));
            }
            None => {
                let Some(token) = bearer(&request) else {
                    return Err(Status::unauthenticated(
                        "present a node certificate, or a bootstrap token as `authorization: Bearer <id>.<secret>`",
                    ));
                };
                let checked = self
                    .store
                    .check_bootstrap_token(token, &node, now)
                    .await
                    .map_err(internal)?;
                if let Err(why) = checked {
                    tracing::warn!(node, %why, "refused a bootstrap token");
                    return Err(Status::unauthenticated(
                        "the bootstrap token is unknown, expired, or not for this node",
                    ));
                }
            }
        }
        self.rate_limit(&node)?;
        let csr = &request.get_ref().csr_pem;
        let response = self
            .issue(csr, &node_id, &format!("node/{node}"), &node)
            .await?;
        Ok(Response::new(response))
    }

    async fn create_certificate(
        &self,
        request: Request<CreateCertificateRequest>,
    ) -> Result<Response<CertificateResponse>, Status> {
        let Some(caller) = peer(&request)
            .and_then(|p| p.identity_at(OffsetDateTime::now_utc()))
            .cloned()
        else {
            return Err(Status::unauthenticated(
                "workload certificates are issued only to nodes presenting a valid node certificate",
            ));
        };
        let Some(node) = components::node_name(&caller) else {
            return Err(Status::permission_denied(format!(
                "{caller} is not a node; only nodes obtain workload certificates"
            )));
        };
        let CreateCertificateRequest {
            namespace,
            workload,
            csr_pem,
        } = request.get_ref();
        for (field, value) in [("namespace", namespace), ("workload", workload)] {
            check_dns_label(value)
                .map_err(|why| Status::invalid_argument(format!("{field}: {why}")))?;
        }
        self.rate_limit(node)?;
        let denied = || {
            Status::permission_denied(format!(
                "workload {namespace}/{workload} is not scheduled on node {node}"
            ))
        };
        let spec = match self
            .store
            .get(Kind::Workload, Some(namespace), workload)
            .await
        {
            Ok(Some(Resource::Workload(object))) => object.spec,
            Ok(_) | Err(StoreError::NotFound(_)) => return Err(denied()),
            Err(error) => return Err(internal(error)),
        };
        if spec.node != node {
            tracing::warn!(
                node,
                workload = %format!("{namespace}/{workload}"),
                scheduled_on = spec.node,
                "refused a certificate for a workload on another node"
            );
            return Err(denied());
        }
        let id = SpiffeId {
            trust_domain: self.trust_domain(),
            namespace: namespace.clone(),
            service_account: spec.service_account.clone(),
        };
        let response = self
            .issue(csr_pem, &id, &format!("{namespace}/{workload}"), node)
            .await?;
        Ok(Response::new(response))
    }
}
