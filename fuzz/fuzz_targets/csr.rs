//! Certificate signing requests as the CA reads them, as PEM text or as
//! DER wrapped in PEM: never a panic, and a certificate names the
//! identity asked for.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use mesh_identity::{CertificateAuthority, SpiffeId};
use time::OffsetDateTime;

static CA: LazyLock<CertificateAuthority> = LazyLock::new(|| {
    CertificateAuthority::generate("cluster.local", OffsetDateTime::now_utc()).unwrap()
});

fuzz_target!(|data: &[u8]| {
    let Some((&form, data)) = data.split_first() else {
        return;
    };
    let text = if form % 2 == 0 {
        match std::str::from_utf8(data) {
            Ok(text) => text.to_owned(),
            Err(_) => return,
        }
    } else {
        pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", data.to_vec()))
    };
    let identity = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/frontend").unwrap();
    if let Ok(issued) = CA.issue_for_csr(&text, &identity, OffsetDateTime::now_utc()) {
        assert_eq!(issued.spiffe_id, identity);
        assert!(issued.pem.contains("BEGIN CERTIFICATE"));
    }
});
