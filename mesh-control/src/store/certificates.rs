//! The seed's CertificateRecord: every certificate the CA issues, with its
//! identity, serial and expiry. A private key is stored only when the CA
//! generated it, and then only sealed under the key-encryption key.

use serde::Serialize;
use sqlx::AnyConnection;
use time::OffsetDateTime;

use super::{
    Backend, StoreError,
    rows::{self, Columns},
};

/// A certificate to record.
#[derive(Debug)]
pub struct NewCertificate<'a> {
    pub service_name: &'a str,
    pub spiffe_id: &'a str,
    pub serial: &'a str,
    pub cert_pem: &'a str,
    /// The private key sealed by the KEK; `None` when the key never left
    /// its node (CSR issuance).
    pub sealed_key: Option<&'a str>,
    pub node: Option<&'a str>,
    pub issued_at: OffsetDateTime,
    pub expiry: OffsetDateTime,
}

/// A recorded certificate.
#[derive(Clone, Debug, Serialize)]
pub struct CertificateRow {
    pub service_name: String,
    pub spiffe_id: String,
    pub serial: String,
    pub cert_pem: String,
    /// Sealed, or empty when the CA never held the key.
    pub private_key: String,
    pub node: Option<String>,
    pub issued_at: String,
    pub expiry: String,
}

fn rfc3339(at: OffsetDateTime) -> Result<String, StoreError> {
    rows::rfc3339(at, "certificate time")
}

pub(super) async fn record(
    conn: &mut AnyConnection,
    b: Backend,
    cert: &NewCertificate<'_>,
) -> Result<(), StoreError> {
    let sql = format!(
        "INSERT INTO CertificateRecord (service_name, cert_pem, private_key, expiry, issued_at, spiffe_id, serial, node) \
         VALUES ($1, $2, $3, {}, {}, $6, $7, $8)",
        b.time_param("$4"),
        b.time_param("$5")
    );
    sqlx::query(&sql)
        .bind(cert.service_name)
        .bind(cert.cert_pem)
        .bind(cert.sealed_key.unwrap_or(""))
        .bind(rfc3339(cert.expiry)?)
        .bind(rfc3339(cert.issued_at)?)
        .bind(cert.spiffe_id)
        .bind(cert.serial)
        .bind(cert.node)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

pub(super) async fn list(
    conn: &mut AnyConnection,
    b: Backend,
    service_name: Option<&str>,
) -> Result<Vec<CertificateRow>, StoreError> {
    let columns = format!(
        "service_name, cert_pem, private_key, {}, {}, spiffe_id, serial, node",
        b.time_column("expiry"),
        b.time_column("issued_at")
    );
    let rows = match service_name {
        Some(name) => {
            let sql = format!(
                "SELECT {columns} FROM CertificateRecord WHERE service_name = $1 ORDER BY issued_at"
            );
            sqlx::query(&sql).bind(name).fetch_all(&mut *conn).await?
        }
        None => {
            let sql =
                format!("SELECT {columns} FROM CertificateRecord ORDER BY service_name, issued_at");
            sqlx::query(&sql).fetch_all(&mut *conn).await?
        }
    };
    rows.iter()
        .map(|row| {
            let c = Columns::new(row, "CertificateRecord".into());
            Ok(CertificateRow {
                service_name: c.text("service_name")?,
                spiffe_id: c.text("spiffe_id")?,
                serial: c.text("serial")?,
                cert_pem: c.text("cert_pem")?,
                private_key: c.text("private_key")?,
                node: c.opt_text("node")?,
                issued_at: c.text("issued_at")?,
                expiry: c.text("expiry")?,
            })
        })
        .collect()
}
