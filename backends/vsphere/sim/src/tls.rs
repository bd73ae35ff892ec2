//! A throw-away certificate authority and a `localhost` server certificate signed by it.
//!
//! Contract: generated fresh at every simulator start, never written to disk by the simulator;
//! the CA's PEM is handed to tests so that "rejected unless its CA is given" is a real check.

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

/// The CA certificate (PEM) and the server's certificate chain and key (PEM).
pub(crate) struct GeneratedTls {
    pub(crate) ca_pem: String,
    pub(crate) server_cert_pem: String,
    pub(crate) server_key_pem: String,
}

/// Generates a CA and a server certificate for `localhost` and `127.0.0.1`.
pub(crate) fn generate() -> Result<GeneratedTls, rcgen::Error> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "stagecore vSphere simulator test CA");
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate()?;
    let mut server_params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
    server_params.distinguished_name.push(DnType::CommonName, "vcenter-sim.localhost");
    let server_cert = server_params.signed_by(&server_key, &issuer)?;
    Ok(GeneratedTls {
        ca_pem: ca_cert.pem(),
        server_cert_pem: server_cert.pem(),
        server_key_pem: server_key.serialize_pem(),
    })
}
