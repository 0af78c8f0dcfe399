//! The `aws` provider: a customer managed key in AWS KMS (aws-sdk-kms over HTTPS).
//!
//! - init: DescribeKey (enabled, SYMMETRIC_DEFAULT, ENCRYPT_DECRYPT, single-region),
//!   ListAliases, GenerateDataKeyWithoutPlaintext (64 bytes), Decrypt, Encrypt.
//! - mount: Decrypt.
//! - Every wrapped key is bound to its keyring id by the encryption context
//!   `{"earfs:keyring": <id>}`, so wrapped keys cannot be moved between keyrings.
//! - The SDK's own retries are off: [`Retry`] is the one retry loop, under a deadline.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_runtime::env_config::file::{EnvConfigFileKind, EnvConfigFiles};
use aws_sdk_kms::Client;
use aws_sdk_kms::config::{ProvideCredentials, Region};
use aws_sdk_kms::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::{KeySpec, KeyState, KeyUsageType};
use tokio::runtime::Runtime;
use zeroize::Zeroizing;

use super::retry::runtime;
use super::{
    KeyDescription, KeyProvider, KmsCall, KmsError, PermissionCheck, Permissions, Retry, creds,
    unwrapped_dek,
};
use crate::crypto::{DEK_LEN, Dek, random_bytes};

/// Provider name in messages.
const PROVIDER: &str = "AWS KMS";
/// Encryption-context key that binds a wrapped data key to its keyring.
pub const CONTEXT_KEY: &str = "earfs:keyring";

/// The AWS permissions earfs needs, with the operation that uses each.
const PERMISSIONS: Permissions = Permissions(&[
    ("kms:DescribeKey", "DescribeKey"),
    ("kms:ListAliases", "ListAliases"),
    (
        "kms:GenerateDataKeyWithoutPlaintext",
        "GenerateDataKeyWithoutPlaintext",
    ),
    ("kms:Decrypt", "Decrypt"),
    ("kms:Encrypt", "Encrypt"),
]);

/// A KMS key or alias ARN: `arn:<partition>:kms:<region>:<account>:key/<id>` or
/// `…:alias/<name>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsKeyArn {
    pub arn: String,
    pub region: String,
    pub is_alias: bool,
}

impl AwsKeyArn {
    /// Parse and check a key or alias ARN. Bare key ids and alias names are refused:
    /// the ARN pins the account and region.
    pub fn parse(s: &str) -> Result<Self, KmsError> {
        let bad = |why: &str| {
            KmsError::InvalidReference(format!(
                "{s:?} is not an AWS KMS key ARN ({why}); expected arn:aws:kms:REGION:ACCOUNT:key/KEY-ID or …:alias/NAME"
            ))
        };
        let parts: Vec<&str> = s.splitn(6, ':').collect();
        let [arn, partition, service, region, account, resource] = parts[..] else {
            return Err(bad("too few ':'-separated parts"));
        };
        if arn != "arn" || !partition.starts_with("aws") {
            return Err(bad("it must start with arn:aws"));
        }
        if service != "kms" {
            return Err(bad("the service must be kms"));
        }
        if region.is_empty()
            || !region
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return Err(bad("no valid region"));
        }
        if account.len() != 12 || !account.chars().all(|c| c.is_ascii_digit()) {
            return Err(bad("the account must be 12 digits"));
        }
        let is_alias = if let Some(id) = resource.strip_prefix("key/") {
            if id.is_empty() || id.contains('/') {
                return Err(bad("no key id after key/"));
            }
            false
        } else if let Some(name) = resource.strip_prefix("alias/") {
            if name.is_empty() || name.starts_with("aws/") {
                return Err(bad(
                    "an alias of a customer managed key is needed, not alias/aws/*",
                ));
            }
            true
        } else {
            return Err(bad("the resource must be key/… or alias/…"));
        };
        Ok(AwsKeyArn {
            arn: s.to_string(),
            region: region.to_string(),
            is_alias,
        })
    }

    /// The region to talk to: `--region` must agree with the ARN's own.
    pub fn region_for(&self, given: Option<&str>) -> Result<String, KmsError> {
        match given {
            Some(r) if r != self.region => Err(KmsError::InvalidReference(format!(
                "the key {} is in region {}, but the region given is {r}; a KMS key is used only in its own region",
                self.arn, self.region
            ))),
            _ => Ok(self.region.clone()),
        }
    }
}

/// What an AWS provider is opened with.
#[derive(Debug, Clone)]
pub struct AwsSettings {
    pub key: AwsKeyArn,
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
    pub profile: Option<String>,
    pub credentials_file: Option<PathBuf>,
}

/// An AWS KMS key, ready to call.
pub struct AwsProvider {
    key: AwsKeyArn,
    client: Client,
    rt: Runtime,
    retry: Retry,
}

impl std::fmt::Debug for AwsProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AwsProvider({})", self.key.arn)
    }
}

/// The shared credentials file the SDK would read when none is named.
fn default_credentials_file() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("AWS_SHARED_CREDENTIALS_FILE") {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".aws/credentials"))
}

impl AwsProvider {
    /// Build the client and resolve credentials (environment, shared credentials file
    /// or profile, web identity, container or instance role), bounded by the deadline.
    pub fn open(s: AwsSettings, retry: Retry) -> Result<Self, KmsError> {
        let region = s.key.region_for(s.region.as_deref())?;
        match &s.credentials_file {
            Some(p) => creds::check_private_file(p)?,
            None => {
                if let Some(p) = default_credentials_file() {
                    creds::check_private_file_if_present(&p)?;
                }
            }
        }
        let call = KmsCall {
            provider: PROVIDER,
            operation: "credentials",
            key: s.key.arn.clone(),
        };
        let rt = runtime(&call)?;
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(region))
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5).min(retry.attempt_timeout))
                    // Our own per-attempt timeout (Retry::run_on) fires first; this is a backstop.
                    .operation_attempt_timeout(retry.attempt_timeout + Duration::from_secs(1))
                    .build(),
            );
        if let Some(p) = &s.profile {
            loader = loader.profile_name(p);
        }
        if let Some(p) = &s.credentials_file {
            loader = loader.profile_files(
                EnvConfigFiles::builder()
                    .include_default_config_file(true)
                    .with_file(EnvConfigFileKind::Credentials, p)
                    .build(),
            );
        }
        if let Some(u) = &s.endpoint_url {
            loader = loader.endpoint_url(u);
        }
        let conf = rt.block_on(loader.load());
        let Some(provider) = conf.credentials_provider() else {
            return Err(KmsError::Credentials(
                "no AWS credentials provider is configured".into(),
            ));
        };
        // Resolve now, so that missing credentials get their own clear message rather
        // than failing the first KMS call.
        retry.run_on(&rt, &call, || async {
            provider.provide_credentials().await.map(|_| ()).map_err(|e| {
                let text = DisplayErrorContext(&e).to_string();
                if text.contains("timeout") || text.contains("timed out") {
                    KmsError::Transient {
                        call: call.clone(),
                        reason: text,
                    }
                } else {
                    KmsError::Credentials(format!(
                        "no usable AWS credentials for {}: {text}. Give the node credentials through the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), a shared credentials file or profile, or an instance role (docs/kms.md)",
                        s.key.arn
                    ))
                }
            })
        })?;
        let client = Client::new(&conf);
        Ok(AwsProvider {
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
            key: self.key.arn.clone(),
        }
    }

    fn context(keyring_id: &str) -> HashMap<String, String> {
        HashMap::from([(CONTEXT_KEY.to_string(), keyring_id.to_string())])
    }

    /// DescribeKey, checked for what earfs needs.
    fn describe(&self) -> Result<KeyDescription, KmsError> {
        let call = self.call("DescribeKey");
        let out = self.retry.run_on(&self.rt, &call, || async {
            self.client
                .describe_key()
                .key_id(&self.key.arn)
                .send()
                .await
                .map_err(|e| classify(&call, e))
        })?;
        let unusable = |reason: String| KmsError::KeyUnusable {
            call: call.clone(),
            reason,
        };
        let Some(m) = out.key_metadata() else {
            return Err(KmsError::Rejected {
                call: call.clone(),
                reason: "the reply has no key metadata".into(),
            });
        };
        match m.key_state() {
            Some(KeyState::Enabled) => {}
            Some(KeyState::PendingDeletion) => {
                let when = m
                    .deletion_date()
                    .map(|d| format!(" (deletion on {d})"))
                    .unwrap_or_default();
                return Err(unusable(format!(
                    "it is pending deletion{when}; cancel the deletion and enable it"
                )));
            }
            Some(KeyState::Disabled) => {
                return Err(unusable("it is disabled; enable it (EnableKey)".into()));
            }
            Some(other) => {
                return Err(unusable(format!("its state is {}", other.as_str())));
            }
            None if m.enabled() => {}
            None => return Err(unusable("it is not enabled".into())),
        }
        if let Some(spec) = m.key_spec()
            && *spec != KeySpec::SymmetricDefault
        {
            return Err(unusable(format!(
                "its key spec is {}; earfs needs a SYMMETRIC_DEFAULT key",
                spec.as_str()
            )));
        }
        // moto omits KeyUsage when the key was created without it; AWS defaults it.
        if let Some(usage) = m.key_usage()
            && *usage != KeyUsageType::EncryptDecrypt
        {
            return Err(unusable(format!(
                "its key usage is {}; earfs needs ENCRYPT_DECRYPT",
                usage.as_str()
            )));
        }
        // An absent MultiRegion counts as single-region.
        if m.multi_region() == Some(true) {
            return Err(unusable(
                "it is a multi-region key; earfs needs a single-region key so that the data key cannot be unwrapped outside the key's region"
                    .into(),
            ));
        }
        let arn = m.arn().unwrap_or(&self.key.arn).to_string();
        Ok(KeyDescription {
            key: arn,
            details: vec![
                format!("key id: {}", m.key_id()),
                "state: Enabled, SYMMETRIC_DEFAULT, ENCRYPT_DECRYPT, single-region".into(),
            ],
        })
    }

    /// The alias names of the key.
    fn aliases(&self, key_id: &str) -> Result<Vec<String>, KmsError> {
        let call = self.call("ListAliases");
        let out = self.retry.run_on(&self.rt, &call, || async {
            self.client
                .list_aliases()
                .key_id(key_id)
                .send()
                .await
                .map_err(|e| classify(&call, e))
        })?;
        Ok(out
            .aliases()
            .iter()
            .filter_map(|a| a.alias_name().map(str::to_string))
            .collect())
    }

    fn generate_wrapped(&self, keyring_id: &str) -> Result<Vec<u8>, KmsError> {
        let call = self.call("GenerateDataKeyWithoutPlaintext");
        let out = self.retry.run_on(&self.rt, &call, || async {
            self.client
                .generate_data_key_without_plaintext()
                .key_id(&self.key.arn)
                .number_of_bytes(DEK_LEN as i32)
                .set_encryption_context(Some(Self::context(keyring_id)))
                .send()
                .await
                .map_err(|e| classify(&call, e))
        })?;
        match out.ciphertext_blob() {
            Some(b) if !b.as_ref().is_empty() => Ok(b.as_ref().to_vec()),
            _ => Err(KmsError::Rejected {
                call,
                reason: "the reply has no ciphertext".into(),
            }),
        }
    }

    fn decrypt(&self, wrapped: &[u8], keyring_id: &str) -> Result<Dek, KmsError> {
        let call = self.call("Decrypt");
        let out = self.retry.run_on(&self.rt, &call, || async {
            self.client
                .decrypt()
                .key_id(&self.key.arn)
                .ciphertext_blob(Blob::new(wrapped))
                .set_encryption_context(Some(Self::context(keyring_id)))
                .send()
                .await
                .map_err(|e| classify(&call, e))
        })?;
        // (An alias ARN is resolved by KMS itself; only a key ARN can be compared.)
        if let Some(k) = out.key_id()
            && !self.key.is_alias
            && !arn_matches(k, &self.key.arn)
        {
            return Err(KmsError::InvalidCiphertext {
                call,
                reason: format!("KMS decrypted it with another key, {k}"),
            });
        }
        let Some(pt) = out.plaintext else {
            return Err(KmsError::Rejected {
                call,
                reason: "the reply has no plaintext".into(),
            });
        };
        let pt = Zeroizing::new(pt.into_inner());
        unwrapped_dek(call, &pt)
    }

    /// Encrypt `plaintext` under the keyring's context (kms:Encrypt): wraps an existing
    /// data key at a rewrap, and a random probe to prove the permission.
    fn encrypt(&self, plaintext: &[u8], keyring_id: &str) -> Result<Vec<u8>, KmsError> {
        let call = self.call("Encrypt");
        let out = self.retry.run_on(&self.rt, &call, || async {
            self.client
                .encrypt()
                .key_id(&self.key.arn)
                .plaintext(Blob::new(plaintext))
                .set_encryption_context(Some(Self::context(keyring_id)))
                .send()
                .await
                .map_err(|e| classify(&call, e))
        })?;
        match out.ciphertext_blob() {
            Some(b) if !b.as_ref().is_empty() => Ok(b.as_ref().to_vec()),
            _ => Err(KmsError::Rejected {
                call,
                reason: "the reply has no ciphertext".into(),
            }),
        }
    }

    /// Encrypt a random probe under the keyring's context: proves kms:Encrypt (used
    /// when keys are added or re-wrapped) works before anything is written.
    fn encrypt_probe(&self, keyring_id: &str) -> Result<Vec<u8>, KmsError> {
        let mut probe = Zeroizing::new([0u8; 32]);
        random_bytes(&mut probe[..])?;
        self.encrypt(&probe[..], keyring_id)
    }
}

/// Whether the key id or ARN in a reply names the key we asked for.
fn arn_matches(reply: &str, arn: &str) -> bool {
    reply == arn || arn.rsplit('/').next().is_some_and(|id| reply.ends_with(id))
}

impl KeyProvider for AwsProvider {
    fn validate(&self) -> Result<KeyDescription, KmsError> {
        let mut d = self.describe()?;
        let aliases = self.aliases(&d.key)?;
        d.details.push(if aliases.is_empty() {
            "aliases: none".into()
        } else {
            format!("aliases: {}", aliases.join(", "))
        });
        Ok(d)
    }

    fn generate(&self, keyring_id: &str) -> Result<(Dek, Vec<u8>), KmsError> {
        let wrapped = self.generate_wrapped(keyring_id)?;
        let dek = self.decrypt(&wrapped, keyring_id)?;
        self.encrypt_probe(keyring_id)?;
        Ok((dek, wrapped))
    }

    fn wrap(&self, dek: &Dek, keyring_id: &str) -> Result<Vec<u8>, KmsError> {
        self.encrypt(dek.expose(), keyring_id)
    }

    fn unwrap(&self, wrapped: &[u8], keyring_id: &str) -> Result<Dek, KmsError> {
        self.decrypt(wrapped, keyring_id)
    }

    fn check_key(&self) -> Result<(), KmsError> {
        self.describe().map(|_| ())
    }

    fn check(&self, keyring_id: &str, wrapped: Option<&[u8]>) -> Vec<PermissionCheck> {
        let mut out = Vec::new();
        let described = self.describe();
        out.push(PERMISSIONS.check("DescribeKey", &described, |d| {
            d.details.get(1).cloned().unwrap_or_default()
        }));
        let key_id = described
            .as_ref()
            .map(|d| d.key.clone())
            .unwrap_or_else(|_| self.key.arn.clone());
        let aliases = self.aliases(&key_id);
        out.push(PERMISSIONS.check("ListAliases", &aliases, |a| {
            if a.is_empty() {
                "no aliases".into()
            } else {
                a.join(", ")
            }
        }));
        let generated = self.generate_wrapped(keyring_id);
        out.push(
            PERMISSIONS.check("GenerateDataKeyWithoutPlaintext", &generated, |b| {
                format!("{DEK_LEN}-byte data key wrapped ({} bytes)", b.len())
            }),
        );
        let encrypted = self.encrypt_probe(keyring_id);
        // What to decrypt: the volume's key, else the fresh one, else the probe.
        let target = match (wrapped, &generated, &encrypted) {
            (Some(w), _, _) => Some((w, "the volume's current data key", false)),
            (None, Ok(g), _) => Some((&g[..], "a fresh data key", false)),
            (None, Err(_), Ok(e)) => Some((&e[..], "a probe", true)),
            _ => None,
        };
        match target {
            Some((blob, what, is_probe)) => {
                let decrypted = self.decrypt(blob, keyring_id).map(|_| ()).or_else(|e| {
                    match e {
                        // A 32-byte probe is not a data key: the call itself succeeded.
                        KmsError::Rejected { .. } if is_probe => Ok(()),
                        other => Err(other),
                    }
                });
                out.push(PERMISSIONS.check("Decrypt", &decrypted, |_| format!("unwrapped {what}")));
            }
            None => out.push(PERMISSIONS.not_tried(
                "Decrypt",
                "no ciphertext to decrypt (GenerateDataKeyWithoutPlaintext and Encrypt failed)",
            )),
        }
        out.push(PERMISSIONS.check("Encrypt", &encrypted, |_| {
            "encrypted a 32-byte probe".into()
        }));
        out
    }
}

/// The causes of an error, outermost first, without the SDK's Debug dumps:
/// "io error: client error (Connect): tcp connect error: Connection refused (os error 111)".
fn causes(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = err.source();
    while let Some(e) = next {
        let text = e.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = e.source();
    }
    if parts.is_empty() {
        err.to_string()
    } else {
        parts.join(": ")
    }
}

/// Classify an SDK error: by the service's error code where there is one (IAM denials
/// are not modelled per operation, so the enum variants are not enough), by HTTP
/// status, and by the kind of dispatch failure.
fn classify<E>(call: &KmsCall, err: SdkError<E>) -> KmsError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let transient = |reason: String| KmsError::Transient {
        call: call.clone(),
        reason,
    };
    match &err {
        SdkError::TimeoutError(_) => return transient("timed out".into()),
        // Connection refused or reset, DNS, TLS: all worth retrying.
        SdkError::DispatchFailure(_) => {
            return transient(format!("cannot reach the KMS endpoint: {}", causes(&err)));
        }
        SdkError::ResponseError(_) => {
            return transient(format!("unreadable reply: {}", causes(&err)));
        }
        SdkError::ConstructionFailure(_) => {
            return KmsError::Rejected {
                call: call.clone(),
                reason: DisplayErrorContext(&err).to_string(),
            };
        }
        _ => {}
    }
    let status = err.raw_response().map(|r| r.status().as_u16()).unwrap_or(0);
    let code = err.code().unwrap_or("").to_string();
    let message = err.message().map(str::to_string).unwrap_or_else(|| {
        if code.is_empty() {
            format!("HTTP {status}")
        } else {
            code.clone()
        }
    });
    let reason = if code.is_empty() || message.contains(&code) {
        message.clone()
    } else {
        format!("{code}: {message}")
    };
    match code.as_str() {
        "AccessDeniedException" | "AccessDenied" | "403" => KmsError::AccessDenied {
            call: call.clone(),
            permission: PERMISSIONS.of(call.operation),
            reason,
        },
        "UnrecognizedClientException"
        | "InvalidClientTokenId"
        | "InvalidSignatureException"
        | "SignatureDoesNotMatch"
        | "IncompleteSignature"
        | "MissingAuthenticationToken"
        | "ExpiredTokenException"
        | "InvalidAccessKeyId" => KmsError::Credentials(format!(
            "{call}: the KMS does not accept this node's AWS credentials: {reason}"
        )),
        "DisabledException"
        | "KMSInvalidStateException"
        | "NotFoundException"
        | "InvalidKeyUsageException"
        | "InvalidArnException" => KmsError::KeyUnusable {
            call: call.clone(),
            reason,
        },
        "InvalidCiphertextException" | "IncorrectKeyException" => KmsError::InvalidCiphertext {
            call: call.clone(),
            reason,
        },
        "ThrottlingException"
        | "Throttling"
        | "TooManyRequestsException"
        | "RequestLimitExceeded"
        | "LimitExceededException"
        | "DependencyTimeoutException"
        | "KMSInternalException"
        | "KeyUnavailableException"
        | "InternalFailure"
        | "ServiceUnavailable"
        | "ServiceUnavailableException"
        | "RequestTimeout"
        | "RequestTimeoutException" => transient(reason),
        _ if status == 429 || status >= 500 => transient(reason),
        _ => KmsError::Rejected {
            call: call.clone(),
            reason,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_arns() {
        let k = AwsKeyArn::parse(
            "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
        )
        .unwrap();
        assert_eq!(k.region, "us-east-1");
        assert!(!k.is_alias);
        let a = AwsKeyArn::parse("arn:aws:kms:eu-west-2:111122223333:alias/earfs").unwrap();
        assert!(a.is_alias);
        assert_eq!(a.region_for(None).unwrap(), "eu-west-2");
        assert!(a.region_for(Some("eu-west-2")).is_ok());
        assert!(matches!(
            a.region_for(Some("us-east-1")),
            Err(KmsError::InvalidReference(_))
        ));
        for bad in [
            "1234abcd-12ab-34cd-56ef-1234567890ab",
            "alias/earfs",
            "arn:aws:s3:us-east-1:111122223333:key/x",
            "arn:aws:kms:us-east-1:1111:key/x",
            "arn:aws:kms::111122223333:key/x",
            "arn:aws:kms:us-east-1:111122223333:key/",
            "arn:aws:kms:us-east-1:111122223333:alias/aws/ebs",
            "arn:aws:kms:us-east-1:111122223333:keyring/x",
        ] {
            assert!(
                matches!(AwsKeyArn::parse(bad), Err(KmsError::InvalidReference(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn reply_key_matches_by_arn_or_id() {
        let arn = "arn:aws:kms:us-east-1:111122223333:key/abcd";
        assert!(arn_matches(arn, arn));
        assert!(arn_matches("abcd", arn));
        assert!(!arn_matches(
            "arn:aws:kms:us-east-1:111122223333:key/other",
            arn
        ));
    }
}
