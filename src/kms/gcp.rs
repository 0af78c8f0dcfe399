//! The `gcp` provider: a customer managed key in Google Cloud KMS, through the official
//! client (`google-cloud-kms-v1`, REST transport) and `google-cloud-auth`
//! (service-account keys become self-signed JWTs; otherwise application default
//! credentials, e.g. the metadata server).
//!
//! - init: keyRings.get, cryptoKeys.get (purpose ENCRYPT_DECRYPT, primary ENABLED),
//!   locations.generateRandomBytes (64 bytes, HSM), cryptoKeys.encrypt, and a decrypt
//!   round trip.
//! - mount: cryptoKeys.decrypt.
//! - The keyring id is the additional authenticated data of every wrapped key.
//! - CRC32C is sent with every request and checked on every reply.
//! - The client's own retries are off: [`Retry`] is the one retry loop.

use std::path::PathBuf;

use google_cloud_gax::error::Error as GaxError;
use google_cloud_gax::error::rpc::Code;
use google_cloud_gax::retry_policy::NeverRetry;
use google_cloud_kms_v1::client::KeyManagementService;
use google_cloud_kms_v1::model::ProtectionLevel;
use google_cloud_kms_v1::model::crypto_key::CryptoKeyPurpose;
use google_cloud_kms_v1::model::crypto_key_version::CryptoKeyVersionState;
use tokio::runtime::Runtime;
use zeroize::Zeroizing;

use super::retry::runtime;
use super::{
    KeyDescription, KeyProvider, KmsCall, KmsError, PermissionCheck, Permissions, Retry, creds,
    unwrapped_dek,
};
use crate::crypto::{DEK_LEN, Dek};

const PROVIDER: &str = "Google Cloud KMS";

/// The Cloud KMS permissions earfs needs, with the method that uses each.
const PERMISSIONS: Permissions = Permissions(&[
    ("cloudkms.keyRings.get", "keyRings.get"),
    ("cloudkms.cryptoKeys.get", "cryptoKeys.get"),
    (
        "cloudkms.locations.generateRandomBytes",
        "locations.generateRandomBytes",
    ),
    (
        "cloudkms.cryptoKeyVersions.useToEncrypt",
        "cryptoKeys.encrypt",
    ),
    (
        "cloudkms.cryptoKeyVersions.useToDecrypt",
        "cryptoKeys.decrypt",
    ),
]);

/// A key resource id: `projects/P/locations/L/keyRings/R/cryptoKeys/K`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcpKeyResource {
    pub name: String,
    pub location: String,
    pub key_ring: String,
}

impl GcpKeyResource {
    /// Parse a key resource id; one naming a version is refused.
    pub fn parse(s: &str) -> Result<Self, KmsError> {
        let bad = |why: &str| {
            KmsError::InvalidReference(format!(
                "{s:?} is not a Cloud KMS key resource id ({why}); expected projects/PROJECT/locations/LOCATION/keyRings/RING/cryptoKeys/KEY"
            ))
        };
        if s.contains("/cryptoKeyVersions/") {
            return Err(bad(
                "it names a key version: give the key itself, without /cryptoKeyVersions/N; earfs wraps with the key's primary version and unwraps with whichever version wrapped, so the key can be rotated",
            ));
        }
        let parts: Vec<&str> = s.split('/').collect();
        let [
            "projects",
            p,
            "locations",
            l,
            "keyRings",
            r,
            "cryptoKeys",
            k,
        ] = parts[..]
        else {
            return Err(bad("wrong shape"));
        };
        let ok = |x: &str| {
            !x.is_empty()
                && x.chars().all(|c| {
                    c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' || c == ':'
                })
        };
        if !(ok(p) && ok(l) && ok(r) && ok(k)) {
            return Err(bad("an empty or invalid path segment"));
        }
        Ok(GcpKeyResource {
            name: s.to_string(),
            location: format!("projects/{p}/locations/{l}"),
            key_ring: format!("projects/{p}/locations/{l}/keyRings/{r}"),
        })
    }
}

/// What a GCP provider is opened with.
#[derive(Debug, Clone)]
pub struct GcpSettings {
    pub key: GcpKeyResource,
    pub credentials: Option<PathBuf>,
    pub endpoint: Option<String>,
}

/// A Cloud KMS key, ready to call.
pub struct GcpProvider {
    key: GcpKeyResource,
    client: KeyManagementService,
    rt: Runtime,
    retry: Retry,
}

impl std::fmt::Debug for GcpProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GcpProvider({})", self.key.name)
    }
}

/// Credentials from a service-account JSON key file (refused if others can read it),
/// or application default credentials.
fn credentials(
    file: Option<&PathBuf>,
) -> Result<google_cloud_auth::credentials::Credentials, KmsError> {
    let env = std::env::var_os("GOOGLE_APPLICATION_CREDENTIALS").map(PathBuf::from);
    let Some(path) = file.or(env.as_ref()) else {
        return google_cloud_auth::credentials::Builder::default()
            .build()
            .map_err(|e| {
                KmsError::Credentials(format!(
                    "no Google Cloud credentials: {e}. Name a service-account key file (--credentials or GOOGLE_APPLICATION_CREDENTIALS), or run on a VM with a service account (docs/kms.md)"
                ))
            });
    };
    creds::check_private_file(path)?;
    let bad = |why: String| {
        KmsError::Credentials(format!(
            "credentials file {} is not a usable service-account key: {why}",
            path.display()
        ))
    };
    let text = Zeroizing::new(std::fs::read(path).map_err(|e| bad(e.to_string()))?);
    let json: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    if json.get("type").and_then(|t| t.as_str()) != Some("service_account") {
        return Err(bad("its \"type\" is not \"service_account\"".into()));
    }
    google_cloud_auth::credentials::service_account::Builder::new(json)
        .build()
        .map_err(|e| bad(e.to_string()))
}

impl GcpProvider {
    /// Load the credentials and build the client (nothing is contacted yet).
    pub fn open(s: GcpSettings, retry: Retry) -> Result<Self, KmsError> {
        let call = KmsCall {
            provider: PROVIDER,
            operation: "client setup",
            key: s.key.name.clone(),
        };
        let rt = runtime(&call)?;
        // The credentials' token cache starts a task on the runtime.
        let creds = {
            let _in_runtime = rt.enter();
            credentials(s.credentials.as_ref())?
        };
        let mut builder = KeyManagementService::builder()
            .with_credentials(creds)
            .with_retry_policy(NeverRetry);
        if let Some(e) = &s.endpoint {
            builder = builder.with_endpoint(e);
        }
        let client = rt
            .block_on(builder.build())
            .map_err(|e| KmsError::Rejected {
                call: call.clone(),
                reason: e.to_string(),
            })?;
        Ok(GcpProvider {
            key: s.key,
            client,
            rt,
            retry,
        })
    }

    fn call(&self, operation: &'static str) -> KmsCall {
        KmsCall {
            provider: PROVIDER,
            operation,
            key: self.key.name.clone(),
        }
    }

    fn get_key_ring(&self) -> Result<String, KmsError> {
        let call = self.call("keyRings.get");
        let ring = self.retry.run_on(&self.rt, &call, || async {
            self.client
                .get_key_ring()
                .set_name(&self.key.key_ring)
                .send()
                .await
                .map_err(|e| classify(&call, e))
        })?;
        Ok(ring.name)
    }

    /// cryptoKeys.get, checked for what earfs needs.
    fn get_crypto_key(&self) -> Result<KeyDescription, KmsError> {
        let call = self.call("cryptoKeys.get");
        let key = self.retry.run_on(&self.rt, &call, || async {
            self.client
                .get_crypto_key()
                .set_name(&self.key.name)
                .send()
                .await
                .map_err(|e| classify(&call, e))
        })?;
        let unusable = |reason: String| KmsError::KeyUnusable {
            call: call.clone(),
            reason,
        };
        if key.purpose != CryptoKeyPurpose::EncryptDecrypt {
            return Err(unusable(format!(
                "its purpose is {}; earfs needs a symmetric ENCRYPT_DECRYPT key",
                key.purpose.name().unwrap_or("unknown")
            )));
        }
        let Some(primary) = &key.primary else {
            return Err(unusable("it has no primary version".into()));
        };
        if primary.state != CryptoKeyVersionState::Enabled {
            return Err(unusable(format!(
                "its primary version {} is {}; enable it or make an enabled version primary",
                primary.name,
                primary.state.name().unwrap_or("not enabled")
            )));
        }
        let mut details = vec![
            format!(
                "primary version: {} (ENABLED, {})",
                primary.name.rsplit('/').next().unwrap_or(""),
                primary
                    .protection_level
                    .name()
                    .unwrap_or("unknown protection level")
            ),
            "purpose: ENCRYPT_DECRYPT".into(),
        ];
        if let Some(p) = key.rotation_period() {
            details.push(format!(
                "automatic rotation every {} s (earfs keeps working: each wrapped key names its version)",
                p.seconds()
            ));
        }
        Ok(KeyDescription {
            key: key.name,
            details,
        })
    }

    fn random_bytes(&self) -> Result<Dek, KmsError> {
        let call = self.call("locations.generateRandomBytes");
        let out = self.retry.run_on(&self.rt, &call, || async {
            self.client
                .generate_random_bytes()
                .set_location(&self.key.location)
                .set_length_bytes(DEK_LEN as i32)
                .set_protection_level(ProtectionLevel::Hsm)
                .send()
                .await
                .map_err(|e| classify(&call, e))
        })?;
        let data = take_secret(out.data);
        check_crc(&call, "random bytes", &data, out.data_crc32c)?;
        Dek::from_slice(&data).map_err(|_| KmsError::Rejected {
            call,
            reason: format!("{} random bytes came back, not {DEK_LEN}", data.len()),
        })
    }

    fn encrypt(&self, plaintext: &[u8], keyring_id: &str) -> Result<Vec<u8>, KmsError> {
        let call = self.call("cryptoKeys.encrypt");
        let aad = keyring_id.as_bytes();
        let out = self.retry.run_on(&self.rt, &call, || async {
            self.client
                .encrypt()
                .set_name(&self.key.name)
                .set_plaintext(secret_request_bytes(plaintext))
                .set_plaintext_crc32c(crc(plaintext))
                .set_additional_authenticated_data(bytes::Bytes::copy_from_slice(aad))
                .set_additional_authenticated_data_crc32c(crc(aad))
                .send()
                .await
                .map_err(|e| classify(&call, e))
        })?;
        if !out.verified_plaintext_crc32c {
            return Err(KmsError::Checksum {
                call,
                what: "request: the KMS did not verify the plaintext's CRC32C".into(),
            });
        }
        if !out.verified_additional_authenticated_data_crc32c {
            return Err(KmsError::Checksum {
                call,
                what: "request: the KMS did not verify the keyring id's CRC32C".into(),
            });
        }
        check_crc(&call, "ciphertext", &out.ciphertext, out.ciphertext_crc32c)?;
        if !out
            .name
            .starts_with(&format!("{}/cryptoKeyVersions/", self.key.name))
        {
            return Err(KmsError::Rejected {
                call,
                reason: format!(
                    "the KMS encrypted with {:?}, not a version of this key",
                    out.name
                ),
            });
        }
        Ok(out.ciphertext.to_vec())
    }

    fn decrypt(&self, wrapped: &[u8], keyring_id: &str) -> Result<Dek, KmsError> {
        let call = self.call("cryptoKeys.decrypt");
        let aad = keyring_id.as_bytes();
        let out = self.retry.run_on(&self.rt, &call, || async {
            self.client
                .decrypt()
                .set_name(&self.key.name)
                .set_ciphertext(bytes::Bytes::copy_from_slice(wrapped))
                .set_ciphertext_crc32c(crc(wrapped))
                .set_additional_authenticated_data(bytes::Bytes::copy_from_slice(aad))
                .set_additional_authenticated_data_crc32c(crc(aad))
                .send()
                .await
                .map_err(|e| classify(&call, e))
        })?;
        let pt = take_secret(out.plaintext);
        check_crc(&call, "plaintext", &pt, out.plaintext_crc32c)?;
        unwrapped_dek(call, &pt)
    }
}

/// Key bytes for a request, in a buffer that is zeroed when the client drops it.
fn secret_request_bytes(b: &[u8]) -> bytes::Bytes {
    bytes::Bytes::from_owner(SecretBuf(Zeroizing::new(b.to_vec())))
}

/// Owner of a request's key bytes (zeroed on drop).
struct SecretBuf(Zeroizing<Vec<u8>>);

impl AsRef<[u8]> for SecretBuf {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Take key bytes out of a reply: copied into a zeroizing buffer, and the reply's own
/// buffer zeroed when it is not shared.
fn take_secret(b: bytes::Bytes) -> Zeroizing<Vec<u8>> {
    let out = Zeroizing::new(b.to_vec());
    if let Ok(mut m) = b.try_into_mut() {
        zeroize::Zeroize::zeroize(&mut m[..]);
    }
    out
}

/// CRC32C as the API carries it (an int64).
fn crc(data: &[u8]) -> i64 {
    i64::from(crc32c::crc32c(data))
}

/// Check a reply's CRC32C; a missing one counts as a mismatch.
fn check_crc(call: &KmsCall, what: &str, data: &[u8], got: Option<i64>) -> Result<(), KmsError> {
    if got == Some(crc(data)) {
        Ok(())
    } else {
        Err(KmsError::Checksum {
            call: call.clone(),
            what: format!("reply's {what}"),
        })
    }
}

impl KeyProvider for GcpProvider {
    fn validate(&self) -> Result<KeyDescription, KmsError> {
        let ring = self.get_key_ring()?;
        let mut d = self.get_crypto_key()?;
        d.details.insert(0, format!("key ring: {ring}"));
        Ok(d)
    }

    fn generate(&self, keyring_id: &str) -> Result<(Dek, Vec<u8>), KmsError> {
        let dek = self.random_bytes()?;
        let wrapped = self.encrypt(dek.expose(), keyring_id)?;
        Ok((dek, wrapped))
    }

    fn wrap(&self, dek: &Dek, keyring_id: &str) -> Result<Vec<u8>, KmsError> {
        self.encrypt(dek.expose(), keyring_id)
    }

    fn unwrap(&self, wrapped: &[u8], keyring_id: &str) -> Result<Dek, KmsError> {
        self.decrypt(wrapped, keyring_id)
    }

    fn check_key(&self) -> Result<(), KmsError> {
        self.get_crypto_key().map(|_| ())
    }

    fn check(&self, keyring_id: &str, wrapped: Option<&[u8]>) -> Vec<PermissionCheck> {
        let mut out = Vec::new();
        let ring = self.get_key_ring();
        out.push(PERMISSIONS.check("keyRings.get", &ring, |r| {
            format!("key ring {}", r.rsplit('/').next().unwrap_or(""))
        }));
        let key = self.get_crypto_key();
        out.push(PERMISSIONS.check("cryptoKeys.get", &key, |d| {
            d.details.first().cloned().unwrap_or_default()
        }));
        let random = self.random_bytes();
        out.push(
            PERMISSIONS.check("locations.generateRandomBytes", &random, |_| {
                format!("{DEK_LEN} bytes from the HSM, CRC32C ok")
            }),
        );
        // Encrypt a fresh key (or, if the RNG call failed, a probe of our own).
        let fresh = match &random {
            Ok(d) => Zeroizing::new(d.expose().to_vec()),
            Err(_) => match Dek::generate() {
                Ok(d) => Zeroizing::new(d.expose().to_vec()),
                Err(_) => Zeroizing::new(vec![0u8; DEK_LEN]),
            },
        };
        let encrypted = self.encrypt(&fresh, keyring_id);
        out.push(PERMISSIONS.check("cryptoKeys.encrypt", &encrypted, |c| {
            format!("wrapped a data key ({} bytes), CRC32C ok", c.len())
        }));
        let target = match (wrapped, &encrypted) {
            (Some(w), _) => Some((w.to_vec(), "the volume's current data key")),
            (None, Ok(c)) => Some((c.clone(), "a fresh data key")),
            _ => None,
        };
        match target {
            Some((blob, what)) => {
                let decrypted = self.decrypt(&blob, keyring_id);
                out.push(PERMISSIONS.check("cryptoKeys.decrypt", &decrypted, |_| {
                    format!("unwrapped {what}, CRC32C ok")
                }));
            }
            None => out.push(PERMISSIONS.not_tried(
                "cryptoKeys.decrypt",
                "no ciphertext to decrypt (encrypt failed)",
            )),
        }
        out
    }
}

/// Classify a client error by its google.rpc status, else its HTTP status, else the
/// kind of transport failure.
fn classify(call: &KmsCall, err: GaxError) -> KmsError {
    let transient = |reason: String| KmsError::Transient {
        call: call.clone(),
        reason,
    };
    if err.is_timeout() || err.is_io() || err.is_connect() || err.is_transport() {
        return transient(format!("cannot reach the KMS endpoint: {err}"));
    }
    if err.is_authentication() {
        return KmsError::Credentials(format!(
            "{call}: cannot get a Google Cloud access token ({err}); give a service-account key file (--credentials or GOOGLE_APPLICATION_CREDENTIALS), or run where the metadata server gives the VM's service account (docs/kms.md)"
        ));
    }
    if let Some(status) = err.status() {
        let reason = format!("{}: {}", status.code.name(), status.message);
        return match status.code {
            Code::PermissionDenied => KmsError::AccessDenied {
                call: call.clone(),
                permission: PERMISSIONS.of(call.operation),
                reason,
            },
            Code::Unauthenticated => KmsError::Credentials(format!(
                "{call}: the KMS does not accept this node's credentials: {reason}"
            )),
            Code::NotFound | Code::FailedPrecondition => KmsError::KeyUnusable {
                call: call.clone(),
                reason,
            },
            Code::InvalidArgument if status.message.contains("checksum") => KmsError::Checksum {
                call: call.clone(),
                what: format!("request ({})", status.message),
            },
            Code::InvalidArgument if status.message.starts_with("Decryption failed") => {
                KmsError::InvalidCiphertext {
                    call: call.clone(),
                    reason,
                }
            }
            Code::Unavailable
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Internal
            | Code::Unknown
            | Code::Aborted => transient(reason),
            _ => KmsError::Rejected {
                call: call.clone(),
                reason,
            },
        };
    }
    match err.http_status_code() {
        Some(s) if s == 408 || s == 429 || s >= 500 => transient(format!("HTTP {s}: {err}")),
        Some(401) => KmsError::Credentials(format!(
            "{call}: the KMS does not accept this node's credentials: {err}"
        )),
        Some(403) => KmsError::AccessDenied {
            call: call.clone(),
            permission: PERMISSIONS.of(call.operation),
            reason: err.to_string(),
        },
        _ => KmsError::Rejected {
            call: call.clone(),
            reason: err.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_resources() {
        let k = GcpKeyResource::parse("projects/p-1/locations/us-east1/keyRings/r/cryptoKeys/k")
            .unwrap();
        assert_eq!(k.location, "projects/p-1/locations/us-east1");
        assert_eq!(k.key_ring, "projects/p-1/locations/us-east1/keyRings/r");
        let e = GcpKeyResource::parse(
            "projects/p/locations/l/keyRings/r/cryptoKeys/k/cryptoKeyVersions/1",
        )
        .unwrap_err();
        assert!(e.to_string().contains("names a key version"), "{e}");
        for bad in [
            "projects/p/locations/l/keyRings/r",
            "projects/p/locations/l/keyRings/r/cryptoKeys/",
            "p/locations/l/keyRings/r/cryptoKeys/k",
            "projects/p/locations/l/keyRings/r/cryptoKeys/k/extra",
            "projects/p/locations//keyRings/r/cryptoKeys/k",
        ] {
            assert!(
                matches!(
                    GcpKeyResource::parse(bad),
                    Err(KmsError::InvalidReference(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn secret_buffers_keep_their_bytes() {
        assert_eq!(&secret_request_bytes(b"abc")[..], b"abc");
        assert_eq!(
            &take_secret(bytes::Bytes::from(vec![1u8, 2, 3]))[..],
            &[1, 2, 3]
        );
    }

    #[test]
    fn crc_is_castagnoli() {
        assert_eq!(crc(b"123456789"), 0xE306_9283);
        let call = KmsCall {
            provider: PROVIDER,
            operation: "x",
            key: "k".into(),
        };
        assert!(check_crc(&call, "d", b"123456789", Some(0xE306_9283)).is_ok());
        assert!(matches!(
            check_crc(&call, "d", b"123456789", Some(1)),
            Err(KmsError::Checksum { .. })
        ));
        assert!(check_crc(&call, "d", b"x", None).is_err());
    }
}
