//! Mount policies: what an admin allows on this machine, what a user asks for
//! on top, bounded by the limits the server sets for the user.
//!
//! Data flow. Two TOML files are read at mount time: the system policy
//! (default `/etc/vaultfs/policy.toml`, which must be owned by root and writable
//! by nobody else) and the user's `~/.config/vaultfs/config.toml`. Each has a
//! `[mount]` table, `[defaults]` rules for every vault and `[vaults."Name"]`
//! rules for one vault (by its decrypted name). Within one file the vault's own
//! rules override the defaults; between the two files the stricter value wins
//! wherever both speak, so a user can tighten but never loosen the admin's
//! policy; the server's per-user limits bound the result. [`Policy::vault`] and
//! [`Policy::mount`] give the resolved values the filesystem core and the mount
//! command enforce.
//!
//! Every key is optional; unknown keys are errors (a typo must not silently
//! fall back to a default), and errors name the file, line, key and problem.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::protocol::Limits;

/// Where the system policy lives unless overridden.
pub const SYSTEM_POLICY: &str = "/etc/vaultfs/policy.toml";
/// Default cache budget: 512 MiB.
pub const DEFAULT_CACHE_BUDGET: u64 = 512 << 20;
/// Default JPEG quality of reduced images.
pub const DEFAULT_JPEG_QUALITY: u8 = 85;
/// Default umask of the presented permissions.
pub const DEFAULT_UMASK: u32 = 0o022;
/// Default end-to-end limit: the original system's 30 MB. Files up to this size
/// are always encrypted, whatever the server says; larger ones follow
/// `oversize`.
pub const DEFAULT_E2E_LIMIT: u64 = 30_000_000;
/// Default longest edge of reduced images, where the policy turns reduction on.
pub const DEFAULT_MAX_EDGE: u32 = 2560;
/// Default floor under the server's `image_max_edge`: a server may ask for
/// smaller images than the policy's `max_edge`, but never below this.
pub const DEFAULT_MIN_EDGE: u32 = 1024;

/// One policy file as written. Every value is optional: `None` means the file
/// does not speak about it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// How the mount itself may be made.
    #[serde(default)]
    pub mount: MountRules,
    /// Rules for every vault.
    #[serde(default)]
    pub defaults: VaultRules,
    /// Rules for single vaults, by decrypted name; they override `defaults`.
    #[serde(default)]
    pub vaults: BTreeMap<String, VaultRules>,
}

/// The `[mount]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MountRules {
    /// Directories under which mounts are allowed (`~/` is the user's home).
    pub allowed_mountpoints: Option<Vec<PathBuf>>,
    /// Whether other local users may see the mount (FUSE allow_other).
    pub allow_other: Option<bool>,
    /// Whether the kernel checks the presented permissions (default_permissions).
    pub default_permissions: Option<bool>,
    /// Owner presented for every entry (default: the mounting user).
    pub uid: Option<u32>,
    /// Group presented for every entry (default: the mounting user's group).
    pub gid: Option<u32>,
    /// Umask of the presented permissions, in octal, e.g. "077".
    pub umask: Option<Umask>,
    /// Memory for decrypted file contents, e.g. "512 MiB".
    pub cache_budget: Option<Size>,
}

/// Rules for a vault (`[defaults]` or `[vaults."Name"]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultRules {
    /// Refuse every change (EROFS).
    pub read_only: Option<bool>,
    /// Whether files and records may be deleted (otherwise EPERM).
    pub allow_delete: Option<bool>,
    /// What happens to files above the end-to-end limit.
    pub oversize: Option<Oversize>,
    /// Files up to this size are end-to-end encrypted; larger ones follow
    /// `oversize`. Only the policy sets it: the server's figure can make a
    /// write fail, never make the client send plaintext.
    pub e2e_limit: Option<Size>,
    /// A lower upload limit than the server's.
    pub upload_limit: Option<Size>,
    /// Image reduction.
    #[serde(default)]
    pub images: ImageRules,
}

/// The `images` table of a vault's rules.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageRules {
    /// Reduce images whose longest edge is above `max_edge` (off unless a
    /// policy turns it on; the server cannot).
    pub reduce: Option<bool>,
    /// Longest edge in pixels; a server may ask for less, down to `min_edge`.
    pub max_edge: Option<u32>,
    /// The floor under the server's `image_max_edge`.
    pub min_edge: Option<u32>,
    /// JPEG quality of reduced images, 1 to 100.
    pub jpeg_quality: Option<u8>,
    /// Which formats are reduced.
    pub formats: Option<Vec<ImageFormat>>,
}

/// What happens to files above the end-to-end limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Oversize {
    /// Stored as plain HTTPS, marked not end-to-end encrypted.
    PassThrough,
    /// Refused with EFBIG.
    Refuse,
}

/// Image formats that can be reduced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    /// .jpg, .jpeg
    Jpeg,
    /// .png
    Png,
    /// .webp (re-encoded losslessly, so kept only if smaller)
    Webp,
}

impl ImageFormat {
    /// Every format.
    pub const ALL: [ImageFormat; 3] = [ImageFormat::Jpeg, ImageFormat::Png, ImageFormat::Webp];

    /// The format a file name's extension says, if any.
    pub fn from_name(name: &std::ffi::OsStr) -> Option<ImageFormat> {
        let ext = Path::new(name).extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "jpg" | "jpeg" => Some(ImageFormat::Jpeg),
            "png" => Some(ImageFormat::Png),
            "webp" => Some(ImageFormat::Webp),
            _ => None,
        }
    }
}

/// A byte size: an integer, or a string with a unit ("30 MB", "512 MiB").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom("expected a size: bytes as an integer, or a string such as \"30 MB\"")
        })? {
            Raw::Int(n) => Ok(Size(n)),
            Raw::Text(s) => parse_size(&s).map(Size).map_err(serde::de::Error::custom),
        }
    }
}

/// A umask, written as an octal string ("022").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Umask(pub u32);

impl<'de> Deserialize<'de> for Umask {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)
            .map_err(|_| serde::de::Error::custom("expected an octal string such as \"022\""))?;
        match u32::from_str_radix(s.trim_start_matches("0o"), 8) {
            Ok(v) if v <= 0o777 => Ok(Umask(v)),
            _ => Err(serde::de::Error::custom(format!(
                "{s:?} is not an octal umask between \"000\" and \"777\""
            ))),
        }
    }
}

/// Parses a size: plain bytes, or with a unit (kB, MB, GB decimal; KiB, MiB, GiB binary).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 =
        num.parse().map_err(|_| format!("invalid size {s:?}: expected a number with an optional unit"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "k" | "kB" | "KB" => 1000,
        "M" | "MB" => 1_000_000,
        "G" | "GB" => 1_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        other => {
            return Err(format!("invalid size unit {other:?} in {s:?}: use B, kB, MB, GB, KiB, MiB or GiB"))
        }
    };
    n.checked_mul(mult).ok_or_else(|| format!("size {s:?} is too large"))
}

/// A policy file that could not be used: which file, and what is wrong (with
/// line and key where the problem is in the text).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct PolicyError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong.
    pub message: String,
}

impl PolicyFile {
    /// Parses `text` read from `path` and checks values that parse but make no sense.
    pub fn parse(path: &Path, text: &str) -> Result<Self, PolicyError> {
        let err = |message: String| PolicyError { path: path.to_path_buf(), message };
        let file: PolicyFile = toml::from_str(text).map_err(|e| err(describe_toml_error(text, &e)))?;
        file.validate(text).map_err(err)?;
        Ok(file)
    }

    /// Reads `path`; a missing file is an empty policy. With `system`, the file
    /// must be owned by root and writable by nobody else, or it is refused:
    /// a policy any user could edit would restrict nothing.
    pub fn load(path: &Path, system: bool) -> Result<Self, PolicyError> {
        let err = |message: String| PolicyError { path: path.to_path_buf(), message };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(PolicyFile::default()),
            Err(e) => return Err(err(format!("cannot read it: {e}"))),
        };
        if system {
            use std::os::unix::fs::MetadataExt;
            let meta = std::fs::metadata(path).map_err(|e| err(format!("cannot read it: {e}")))?;
            if meta.uid() != 0 || meta.mode() & 0o022 != 0 {
                return Err(err(format!(
                    "a system policy must be owned by root and writable only by root (owner uid {}, mode {:o})",
                    meta.uid(),
                    meta.mode() & 0o777
                )));
            }
        }
        Self::parse(path, &text)
    }

    fn validate(&self, text: &str) -> Result<(), String> {
        let at = |key: &str, table: &str| key_location(text, table, key);
        if let Some(dirs) = &self.mount.allowed_mountpoints {
            for d in dirs {
                if !d.is_absolute() && !d.starts_with("~") {
                    return Err(format!(
                        "{}key `mount.allowed_mountpoints`: {} is neither absolute nor under ~/",
                        at("allowed_mountpoints", "mount"),
                        d.display()
                    ));
                }
            }
        }
        if self.mount.cache_budget.is_some_and(|s| s.0 < 1 << 20) {
            return Err(format!(
                "{}key `mount.cache_budget`: must be at least 1 MiB",
                at("cache_budget", "mount")
            ));
        }
        let tables = std::iter::once(("defaults".to_string(), &self.defaults)).chain(
            self.vaults.iter().map(|(name, r)| (format!("vaults.{}", toml::Value::String(name.clone())), r)),
        );
        for (table, rules) in tables {
            if let (Some(e2e), Some(up)) = (rules.e2e_limit, rules.upload_limit) {
                if e2e.0 > up.0 {
                    return Err(format!(
                        "{}key `{table}.e2e_limit`: must not exceed `upload_limit`",
                        at("e2e_limit", &table)
                    ));
                }
            }
            let images = format!("{table}.images");
            for (key, edge) in [("max_edge", rules.images.max_edge), ("min_edge", rules.images.min_edge)] {
                if edge.is_some_and(|e| e < 16) {
                    return Err(format!(
                        "{}key `{images}.{key}`: must be at least 16 pixels",
                        at(key, &images)
                    ));
                }
            }
            if let (Some(min), Some(max)) = (rules.images.min_edge, rules.images.max_edge) {
                if min > max {
                    return Err(format!(
                        "{}key `{images}.min_edge`: must not exceed `max_edge`",
                        at("min_edge", &images)
                    ));
                }
            }
            if rules.images.jpeg_quality.is_some_and(|q| !(1..=100).contains(&q)) {
                return Err(format!(
                    "{}key `{images}.jpeg_quality`: must be between 1 and 100",
                    at("jpeg_quality", &images)
                ));
            }
        }
        if self.vaults.keys().any(|k| k.is_empty()) {
            return Err("table `vaults`: a vault name must not be empty".into());
        }
        Ok(())
    }

    /// This file's rules for the vault `name`: its own table over `defaults`.
    fn rules_for(&self, name: &str) -> VaultRules {
        let d = &self.defaults;
        let Some(v) = self.vaults.get(name) else { return d.clone() };
        VaultRules {
            read_only: v.read_only.or(d.read_only),
            allow_delete: v.allow_delete.or(d.allow_delete),
            oversize: v.oversize.or(d.oversize),
            e2e_limit: v.e2e_limit.or(d.e2e_limit),
            upload_limit: v.upload_limit.or(d.upload_limit),
            images: ImageRules {
                reduce: v.images.reduce.or(d.images.reduce),
                max_edge: v.images.max_edge.or(d.images.max_edge),
                min_edge: v.images.min_edge.or(d.images.min_edge),
                jpeg_quality: v.images.jpeg_quality.or(d.images.jpeg_quality),
                formats: v.images.formats.clone().or_else(|| d.images.formats.clone()),
            },
        }
    }
}

/// "line N: " for `key` in `[table]` of `text`, if found.
fn key_location(text: &str, table: &str, key: &str) -> String {
    let norm = |s: &str| s.replace([' ', '"'], "");
    let mut current = String::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if let Some(h) = t.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            current = norm(h);
            continue;
        }
        if current == norm(table) && t.split('=').next().is_some_and(|k| k.trim() == key) {
            return format!("line {}: ", i + 1);
        }
    }
    String::new()
}

/// Turns a TOML error into "line N, column C: key `a.b`: what is wrong".
fn describe_toml_error(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim_end().to_string();
    let Some(span) = e.span() else { return message };
    let before = &text[..span.start.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |p| p + 1) + 1;
    // The table the error is in, and the key on that line, for the message.
    let mut table = String::new();
    for l in before.lines() {
        if let Some(h) = l.trim().strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            table = h.trim().to_string();
        }
    }
    let this_line = text.lines().nth(line - 1).unwrap_or("");
    let key = this_line.split_once('=').map(|(k, _)| k.trim().to_string());
    let key = match (key, table.is_empty()) {
        (Some(k), true) => format!("key `{k}`: "),
        (Some(k), false) => format!("key `{table}.{k}`: "),
        (None, false) => format!("table `{table}`: "),
        (None, true) => String::new(),
    };
    format!("line {line}, column {column}: {key}{message}")
}

/// The admin's and the user's policy files together.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// The system policy.
    pub admin: PolicyFile,
    /// The user's config.
    pub user: PolicyFile,
}

/// The resolved rules for one vault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VaultPolicy {
    /// Refuse every change (EROFS).
    pub read_only: bool,
    /// Deletes allowed (otherwise EPERM).
    pub allow_delete: bool,
    /// Files above `e2e_limit`.
    pub oversize: Oversize,
    /// Largest end-to-end encrypted file: from the policy files alone (and
    /// never above `upload_limit`, so nothing passes through for that).
    pub e2e_limit: u64,
    /// Largest file: the policy's, bounded by the server's.
    pub upload_limit: u64,
    /// What the server says its end-to-end limit for this user is. It decides
    /// nothing about encryption: a file the policy encrypts but that is above
    /// this figure is refused (EFBIG) rather than sent in plaintext.
    pub server_e2e_limit: u64,
    /// The server marks this vault end-to-end only: files the policy would
    /// pass through are refused (EFBIG) instead, before any upload.
    pub e2e_required: bool,
    /// Image reduction.
    pub images: ImagePolicy,
}

/// Why a file of some size may not be stored in a vault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SizeRefusal {
    /// Above the upload limit.
    Upload(u64),
    /// Above the end-to-end limit where the policy refuses such files.
    Oversize(u64),
    /// Above the end-to-end limit in a vault the server marks end-to-end only.
    E2eRequired(u64),
    /// Within the policy's end-to-end limit but above the server's figure.
    ServerE2eLimit {
        /// The server's figure.
        server: u64,
        /// The policy's.
        policy: u64,
    },
}

impl std::fmt::Display for SizeRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SizeRefusal::Upload(limit) => write!(f, "the upload limit is {limit} bytes"),
            SizeRefusal::Oversize(limit) => write!(
                f,
                "the mount policy refuses files above the end-to-end limit of {limit} bytes in this vault"
            ),
            SizeRefusal::E2eRequired(limit) => write!(
                f,
                "this vault is end-to-end only and files above {limit} bytes (the policy's end-to-end \
                 limit) would be sent without end-to-end encryption"
            ),
            SizeRefusal::ServerE2eLimit { server, policy } => write!(
                f,
                "the server limits end-to-end files to {server} bytes, but this client's policy encrypts \
                 files up to {policy} bytes, so it refuses rather than send one in plaintext"
            ),
        }
    }
}

impl VaultPolicy {
    /// Whether a file of `size` bytes is stored end to end here (else it
    /// passes through, where [`VaultPolicy::check_size`] allows it).
    pub fn encrypts(&self, size: u64) -> bool {
        size <= self.e2e_limit
    }

    /// Refuses a size this vault cannot store without breaking a rule.
    pub fn check_size(&self, size: u64) -> Result<(), SizeRefusal> {
        if size > self.upload_limit {
            return Err(SizeRefusal::Upload(self.upload_limit));
        }
        if !self.encrypts(size) {
            if self.oversize == Oversize::Refuse {
                return Err(SizeRefusal::Oversize(self.e2e_limit));
            }
            if self.e2e_required {
                return Err(SizeRefusal::E2eRequired(self.e2e_limit));
            }
        } else if size > self.server_e2e_limit {
            return Err(SizeRefusal::ServerE2eLimit {
                server: self.server_e2e_limit,
                policy: self.e2e_limit,
            });
        }
        Ok(())
    }
}

/// Resolved image reduction rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImagePolicy {
    /// On or off.
    pub reduce: bool,
    /// Longest edge in pixels: the policy's, lowered by the server's figure
    /// no further than the policy's floor.
    pub max_edge: u32,
    /// JPEG quality.
    pub jpeg_quality: u8,
    /// Formats reduced.
    pub formats: Vec<ImageFormat>,
}

impl ImagePolicy {
    /// Whether a file called `name` is an image this policy reduces, and its format.
    pub fn applies_to(&self, name: &std::ffi::OsStr) -> Option<ImageFormat> {
        ImageFormat::from_name(name).filter(|f| self.reduce && self.formats.contains(f))
    }
}

/// Resolved rules for the mount.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MountPolicy {
    /// Each file's allowed directories (a mount point must be under one of
    /// each list given); empty when neither file restricts.
    pub allowed_mountpoints: Vec<Vec<PathBuf>>,
    /// FUSE allow_other.
    pub allow_other: bool,
    /// FUSE default_permissions.
    pub default_permissions: bool,
    /// Presented owner, if not the mounting user.
    pub uid: Option<u32>,
    /// Presented group, if not the mounting user's.
    pub gid: Option<u32>,
    /// Umask of the presented permissions.
    pub umask: u32,
    /// Cache budget in bytes.
    pub cache_budget: u64,
}

impl MountPolicy {
    /// Checks that `mountpoint` (absolute, resolved) is allowed; `home` expands `~/`.
    pub fn check_mountpoint(&self, mountpoint: &Path, home: Option<&Path>) -> Result<(), String> {
        for list in &self.allowed_mountpoints {
            let ok = list.iter().any(|dir| {
                let dir = match (dir.strip_prefix("~"), home) {
                    (Ok(rest), Some(home)) => home.join(rest),
                    (Ok(_), None) => return false,
                    (Err(_), _) => dir.clone(),
                };
                mountpoint.starts_with(&dir)
            });
            if !ok {
                let dirs: Vec<String> = list.iter().map(|d| d.display().to_string()).collect();
                return Err(format!(
                    "the policy does not allow mounting at {}; allowed: {}",
                    mountpoint.display(),
                    dirs.join(", ")
                ));
            }
        }
        Ok(())
    }
}

/// Both said: `stricter`; one said: that one; neither: `default`.
fn merge<T>(admin: Option<T>, user: Option<T>, default: T, stricter: impl FnOnce(T, T) -> T) -> T {
    match (admin, user) {
        (Some(a), Some(u)) => stricter(a, u),
        (Some(v), None) | (None, Some(v)) => v,
        (None, None) => default,
    }
}

/// The edge images are reduced to: the policies' `max_edge` (the smaller of
/// the two), lowered by the server's figure at most down to the floor (the
/// larger `min_edge`, but never above that `max_edge`).
fn image_edge(admin: &ImageRules, user: &ImageRules, server: u32) -> u32 {
    let max =
        min_of([admin.max_edge.map(u64::from), user.max_edge.map(u64::from)], u64::from(DEFAULT_MAX_EDGE));
    let floor = merge(admin.min_edge, user.min_edge, DEFAULT_MIN_EDGE, u32::max);
    let floor = u64::from(floor).min(max);
    max.min(u64::from(server).max(floor)) as u32
}

fn min_of(values: impl IntoIterator<Item = Option<u64>>, bound: u64) -> u64 {
    values.into_iter().flatten().fold(bound, u64::min)
}

impl Policy {
    /// Reads the system policy at `system` and the user config at `user`.
    pub fn load(system: &Path, user: &Path) -> Result<Self, PolicyError> {
        Ok(Policy { admin: PolicyFile::load(system, true)?, user: PolicyFile::load(user, false)? })
    }

    /// The rules for the vault called `name`, within the server's `limits`.
    pub fn vault(&self, name: &str, limits: &Limits) -> VaultPolicy {
        let (a, u) = (self.admin.rules_for(name), self.user.rules_for(name));
        let upload_limit =
            min_of([a.upload_limit.map(|s| s.0), u.upload_limit.map(|s| s.0)], limits.upload_limit);
        // The server's e2e_limit is not among these: what is encrypted is the
        // client's decision alone (see `VaultPolicy::check_size`).
        let e2e_limit =
            merge(a.e2e_limit.map(|s| s.0), u.e2e_limit.map(|s| s.0), DEFAULT_E2E_LIMIT, u64::min)
                .min(upload_limit);
        let oversize = merge(a.oversize, u.oversize, Oversize::PassThrough, |a, u| {
            if a == Oversize::Refuse || u == Oversize::Refuse {
                Oversize::Refuse
            } else {
                Oversize::PassThrough
            }
        });
        let (ai, ui) = (a.images, u.images);
        let images = ImagePolicy {
            // Reducing is the stricter choice: an admin's "on" cannot be turned
            // off. Off where neither says: reducing loses detail, so only a
            // policy may ask for it, never the server.
            reduce: merge(ai.reduce, ui.reduce, false, |a, u| a || u),
            max_edge: image_edge(&ai, &ui, limits.image_max_edge),
            jpeg_quality: merge(ai.jpeg_quality, ui.jpeg_quality, DEFAULT_JPEG_QUALITY, u8::min),
            formats: merge(ai.formats, ui.formats, ImageFormat::ALL.to_vec(), |mut a, u| {
                a.extend(u);
                a.sort();
                a.dedup();
                a
            }),
        };
        VaultPolicy {
            read_only: merge(a.read_only, u.read_only, false, |a, u| a || u),
            allow_delete: merge(a.allow_delete, u.allow_delete, true, |a, u| a && u),
            oversize,
            e2e_limit,
            upload_limit,
            server_e2e_limit: limits.e2e_limit,
            e2e_required: false,
            images,
        }
    }

    /// The rules for the mount.
    pub fn mount(&self) -> MountPolicy {
        let (a, u) = (&self.admin.mount, &self.user.mount);
        let allow_other = merge(a.allow_other, u.allow_other, false, |a, u| a && u);
        MountPolicy {
            allowed_mountpoints: [&a.allowed_mountpoints, &u.allowed_mountpoints]
                .into_iter()
                .flatten()
                .cloned()
                .collect(),
            allow_other,
            // Other users may see the mount only through the kernel's
            // permission checks: without them, every local user could read
            // every file (the presented modes would decide nothing).
            default_permissions: allow_other
                || merge(a.default_permissions, u.default_permissions, false, |a, u| a || u),
            // The admin's choice of presented owner stands; otherwise the user's.
            uid: a.uid.or(u.uid),
            gid: a.gid.or(u.gid),
            umask: merge(a.umask.map(|m| m.0), u.umask.map(|m| m.0), DEFAULT_UMASK, |a, u| a | u),
            cache_budget: min_of(
                [a.cache_budget.map(|s| s.0), u.cache_budget.map(|s| s.0)],
                if a.cache_budget.is_none() && u.cache_budget.is_none() {
                    DEFAULT_CACHE_BUDGET
                } else {
                    u64::MAX
                },
            ),
        }
    }

    /// Vault names either file has rules for.
    pub fn named_vaults(&self) -> Vec<String> {
        let mut names: Vec<String> =
            self.admin.vaults.keys().chain(self.user.vaults.keys()).cloned().collect();
        names.sort();
        names.dedup();
        names
    }
}

#[cfg(test)]
mod tests;
