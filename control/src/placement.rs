//! Sandbox placement: which host of a cluster runs a new sandbox. Pure
//! logic over host records and counts (no store, no clock, no IO), so every
//! exclusion reason is tested here.
//!
//! A host is a candidate when it is in the cluster (and is the requested
//! host, if one is named), is connected with its credential intact, reports
//! every required tag and trait and the `docker` trait, has room for one
//! more sandbox (the larger of what telemetry reports running and what the
//! store holds active, against the capacity telemetry reports) and reports
//! at least the sandbox's memory as available. Among candidates, a host that
//! reports the image as cached wins; then the least busy; then the one with
//! the most available memory; then the lowest id (deterministic).

use std::fmt;

use crate::store::{Host, HostStatus};

/// The trait a host reports when its container engine answers.
pub const DOCKER_TRAIT: &str = "docker";

/// What the new sandbox needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlacementRequest {
    pub cluster_id: String,
    /// Only this host may be chosen.
    pub host_id: Option<String>,
    pub tags: Vec<String>,
    pub traits: Vec<String>,
    /// The image reference the sandbox runs.
    pub image: String,
    /// Memory the sandbox may use (its limit); 0 = nothing is checked.
    pub memory_bytes: u64,
}

/// A host with what the store knows about its load.
#[derive(Debug, Clone)]
pub struct Candidate<'a> {
    pub host: &'a Host,
    /// Whether the host has an open stream right now.
    pub stream_open: bool,
    /// Sandboxes the store holds as provisioning or running on the host.
    pub active_sandboxes: u32,
}

/// Why a host was not chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exclusion {
    OtherCluster(String),
    Disconnected,
    NoToken,
    NotPlaceable,
    MissingTags(Vec<String>),
    MissingTraits(Vec<String>),
    NoContainerRuntime,
    AtCapacity { active: u32, capacity: u32 },
    NotEnoughMemory { available: u64, needed: u64 },
}

impl fmt::Display for Exclusion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let quoted = |items: &[String]| {
            items
                .iter()
                .map(|i| format!("`{i}`"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self {
            Exclusion::OtherCluster(cluster) => write!(f, "in cluster `{cluster}`"),
            Exclusion::Disconnected => f.write_str("disconnected"),
            Exclusion::NoToken => f.write_str("no_token (its credential was revoked)"),
            Exclusion::NotPlaceable => f.write_str("not placeable"),
            Exclusion::MissingTags(tags) => write!(f, "lacks tag {}", quoted(tags)),
            Exclusion::MissingTraits(traits) => write!(f, "lacks trait {}", quoted(traits)),
            Exclusion::NoContainerRuntime => {
                f.write_str("no container runtime (does not report the `docker` trait)")
            }
            Exclusion::AtCapacity { active, capacity } => {
                write!(f, "full ({active} of {capacity} sandboxes)")
            }
            Exclusion::NotEnoughMemory { available, needed } => write!(
                f,
                "not enough memory ({} MiB available, {} MiB needed)",
                available >> 20,
                needed >> 20
            ),
        }
    }
}

/// The chosen host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub host_id: String,
    /// The host reports the image as cached.
    pub image_cached: bool,
}

/// No host fits: each host considered and why it was left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoHost {
    pub cluster_id: String,
    pub excluded: Vec<(String, String, Vec<Exclusion>)>,
}

impl fmt::Display for NoHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.excluded.is_empty() {
            return write!(
                f,
                "no host can take the sandbox: cluster `{}` has no host (enroll one with a provisioning token)",
                self.cluster_id
            );
        }
        write!(
            f,
            "no host can take the sandbox in cluster `{}`:",
            self.cluster_id
        )?;
        for (i, (id, name, reasons)) in self.excluded.iter().enumerate() {
            let reasons: Vec<String> = reasons.iter().map(ToString::to_string).collect();
            let sep = if i == 0 { " " } else { "; " };
            if name.is_empty() || name == id {
                write!(f, "{sep}{id}: {}", reasons.join(", "))?;
            } else {
                write!(f, "{sep}{id} ({name}): {}", reasons.join(", "))?;
            }
        }
        Ok(())
    }
}

/// An image reference as the engine resolves it: the repository (Docker
/// Hub's implied `docker.io/` and `library/` dropped, as the engine reports
/// names), the tag and the digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef<'a> {
    pub repository: &'a str,
    pub tag: Option<&'a str>,
    pub digest: Option<&'a str>,
}

impl<'a> ImageRef<'a> {
    /// None for an image id (`sha256:...`) or an empty text.
    pub fn parse(text: &'a str) -> Option<ImageRef<'a>> {
        if text.is_empty() || text.starts_with("sha256:") {
            return None;
        }
        let (name, digest) = match text.split_once('@') {
            Some((name, digest)) => (name, Some(digest)),
            None => (text, None),
        };
        // A tag follows the last `:` after the last `/` (a registry's port
        // is not a tag).
        let last = name.rfind('/').map_or(0, |i| i + 1);
        let (repository, tag) = match name[last..].rfind(':') {
            Some(i) => (&name[..last + i], Some(&name[last + i + 1..])),
            None => (name, None),
        };
        let repository = repository
            .strip_prefix("docker.io/")
            .or_else(|| repository.strip_prefix("index.docker.io/"))
            .unwrap_or(repository);
        let repository = match repository.strip_prefix("library/") {
            Some(short) if !short.contains('/') => short,
            _ => repository,
        };
        (!repository.is_empty()).then_some(ImageRef {
            repository,
            tag,
            digest,
        })
    }
}

/// Whether a host's telemetry lists the image, as the engine would resolve
/// the reference without a pull: an image id by itself; a reference with a
/// digest by the repository digest the engine reports
/// (`repository@sha256:...`, the same repository and digest; a tag beside
/// the digest does not count, as for the engine); any other by repository
/// and tag (`latest` when none is given).
pub fn image_cached(host: &Host, image: &str) -> bool {
    let cached = &host.telemetry.cached_images;
    if image.starts_with("sha256:") {
        return cached.iter().any(|c| c == image);
    }
    let Some(wanted) = ImageRef::parse(image) else {
        return false;
    };
    cached
        .iter()
        .filter_map(|c| ImageRef::parse(c))
        .any(|held| {
            held.repository == wanted.repository
                && match wanted.digest {
                    Some(digest) => held.digest == Some(digest),
                    None => {
                        held.digest.is_none()
                            && held.tag.unwrap_or("latest") == wanted.tag.unwrap_or("latest")
                    }
                }
        })
}

/// Every reason the host cannot take the sandbox (empty = it can).
pub fn exclusions(request: &PlacementRequest, candidate: &Candidate<'_>) -> Vec<Exclusion> {
    let host = candidate.host;
    let telemetry = &host.telemetry;
    let mut out = Vec::new();
    if host.cluster_id != request.cluster_id {
        out.push(Exclusion::OtherCluster(host.cluster_id.clone()));
    }
    match host.status {
        HostStatus::NoToken => out.push(Exclusion::NoToken),
        HostStatus::Disconnected => out.push(Exclusion::Disconnected),
        HostStatus::Connected if !candidate.stream_open => out.push(Exclusion::Disconnected),
        HostStatus::Connected => {}
    }
    if !host.placeable && host.status != HostStatus::NoToken {
        out.push(Exclusion::NotPlaceable);
    }
    let missing = |wanted: &[String], have: &[String]| -> Vec<String> {
        wanted
            .iter()
            .filter(|w| !have.contains(w))
            .cloned()
            .collect()
    };
    let tags = missing(&request.tags, &telemetry.tags);
    if !tags.is_empty() {
        out.push(Exclusion::MissingTags(tags));
    }
    let traits = missing(&request.traits, &telemetry.traits);
    if !traits.is_empty() {
        out.push(Exclusion::MissingTraits(traits));
    }
    if !telemetry.traits.iter().any(|t| t == DOCKER_TRAIT)
        && !request.traits.iter().any(|t| t == DOCKER_TRAIT)
    {
        out.push(Exclusion::NoContainerRuntime);
    }
    let active = candidate.active_sandboxes.max(telemetry.running_sandboxes);
    if telemetry.sandbox_capacity > 0 && active >= telemetry.sandbox_capacity {
        out.push(Exclusion::AtCapacity {
            active,
            capacity: telemetry.sandbox_capacity,
        });
    }
    if request.memory_bytes > 0
        && telemetry.memory_available_bytes > 0
        && telemetry.memory_available_bytes < request.memory_bytes
    {
        out.push(Exclusion::NotEnoughMemory {
            available: telemetry.memory_available_bytes,
            needed: request.memory_bytes,
        });
    }
    out
}

/// Chooses a host, or says why none fits. With `request.host_id`, only that
/// host is considered (the caller checks that it exists).
pub fn place(
    request: &PlacementRequest,
    candidates: &[Candidate<'_>],
) -> Result<Placement, NoHost> {
    let considered = candidates
        .iter()
        .filter(|c| request.host_id.as_deref().is_none_or(|id| c.host.id == id));
    let mut fitting = Vec::new();
    let mut excluded = Vec::new();
    for candidate in considered {
        let reasons = exclusions(request, candidate);
        if reasons.is_empty() {
            fitting.push(candidate);
        } else {
            excluded.push((
                candidate.host.id.clone(),
                candidate.host.name.clone(),
                reasons,
            ));
        }
    }
    let best = fitting.into_iter().min_by(|a, b| {
        let key = |c: &Candidate<'_>| {
            (
                !image_cached(c.host, &request.image),
                c.active_sandboxes.max(c.host.telemetry.running_sandboxes),
                std::cmp::Reverse(c.host.telemetry.memory_available_bytes),
            )
        };
        key(a).cmp(&key(b)).then_with(|| a.host.id.cmp(&b.host.id))
    });
    match best {
        Some(candidate) => Ok(Placement {
            host_id: candidate.host.id.clone(),
            image_cached: image_cached(candidate.host, &request.image),
        }),
        None => Err(NoHost {
            cluster_id: request.cluster_id.clone(),
            excluded,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::Telemetry;

    fn host(id: &str) -> Host {
        Host {
            id: id.to_owned(),
            name: format!("{id}-name"),
            cluster_id: "cls_default".into(),
            token_id: "tok_a".into(),
            credential_hash: String::new(),
            status: HostStatus::Connected,
            telemetry: Telemetry {
                traits: vec!["docker".into(), "amd64".into()],
                tags: vec!["eu".into()],
                memory_available_bytes: 8 << 30,
                sandbox_capacity: 4,
                ..Default::default()
            },
            enrolled_at_ms: 1,
            last_seen_ms: 1,
            revoked_at_ms: 0,
            revoked_reason: String::new(),
            placeable: true,
        }
    }

    fn candidate(host: &Host) -> Candidate<'_> {
        Candidate {
            host,
            stream_open: true,
            active_sandboxes: 0,
        }
    }

    fn request() -> PlacementRequest {
        PlacementRequest {
            cluster_id: "cls_default".into(),
            image: "gstacks-test/busybox:1".into(),
            memory_bytes: 512 << 20,
            ..Default::default()
        }
    }

    fn only_reason(host: &Host, request: &PlacementRequest) -> Exclusion {
        let reasons = exclusions(request, &candidate(host));
        assert_eq!(reasons.len(), 1, "{reasons:?}");
        reasons.into_iter().next().unwrap()
    }

    #[test]
    fn a_healthy_host_fits() {
        let h = host("hst_a");
        assert!(exclusions(&request(), &candidate(&h)).is_empty());
        let placed = place(&request(), &[candidate(&h)]).unwrap();
        assert_eq!(placed.host_id, "hst_a");
        assert!(!placed.image_cached);
    }

    #[test]
    fn every_exclusion_reason() {
        let r = request();
        let mut h = host("hst_a");
        h.cluster_id = "cls_other".into();
        assert_eq!(
            only_reason(&h, &r),
            Exclusion::OtherCluster("cls_other".into())
        );

        let mut h = host("hst_a");
        h.status = HostStatus::Disconnected;
        assert_eq!(only_reason(&h, &r), Exclusion::Disconnected);

        // Connected in the store but no stream (it just dropped).
        let h = host("hst_a");
        let stale = Candidate {
            stream_open: false,
            ..candidate(&h)
        };
        assert_eq!(exclusions(&r, &stale), [Exclusion::Disconnected]);

        let mut h = host("hst_a");
        h.status = HostStatus::NoToken;
        h.placeable = false;
        assert_eq!(only_reason(&h, &r), Exclusion::NoToken);

        let mut h = host("hst_a");
        h.placeable = false;
        assert_eq!(only_reason(&h, &r), Exclusion::NotPlaceable);

        let tagged = PlacementRequest {
            tags: vec!["eu".into(), "gpu".into()],
            ..request()
        };
        assert_eq!(
            only_reason(&host("hst_a"), &tagged),
            Exclusion::MissingTags(vec!["gpu".into()])
        );

        let traited = PlacementRequest {
            traits: vec!["trusted".into(), "amd64".into()],
            ..request()
        };
        assert_eq!(
            only_reason(&host("hst_a"), &traited),
            Exclusion::MissingTraits(vec!["trusted".into()])
        );

        let mut h = host("hst_a");
        h.telemetry.traits = vec!["amd64".into()];
        assert_eq!(only_reason(&h, &r), Exclusion::NoContainerRuntime);

        let h = host("hst_a");
        let busy = Candidate {
            active_sandboxes: 4,
            ..candidate(&h)
        };
        assert_eq!(
            exclusions(&r, &busy),
            [Exclusion::AtCapacity {
                active: 4,
                capacity: 4
            }]
        );
        // Telemetry's count counts too (containers the store does not know yet).
        let mut h = host("hst_a");
        h.telemetry.running_sandboxes = 5;
        assert_eq!(
            only_reason(&h, &r),
            Exclusion::AtCapacity {
                active: 5,
                capacity: 4
            }
        );
        // No capacity reported: no count limit.
        let mut h = host("hst_a");
        h.telemetry.sandbox_capacity = 0;
        h.telemetry.running_sandboxes = 100;
        assert!(exclusions(&r, &candidate(&h)).is_empty());

        let mut h = host("hst_a");
        h.telemetry.memory_available_bytes = 100 << 20;
        assert_eq!(
            only_reason(&h, &r),
            Exclusion::NotEnoughMemory {
                available: 100 << 20,
                needed: 512 << 20
            }
        );
        // Memory not reported: not held against the host.
        h.telemetry.memory_available_bytes = 0;
        assert!(exclusions(&r, &candidate(&h)).is_empty());
    }

    #[test]
    fn several_reasons_are_all_listed_in_the_error() {
        let mut a = host("hst_a");
        a.status = HostStatus::Disconnected;
        let mut b = host("hst_b");
        b.telemetry.tags.clear();
        b.telemetry.memory_available_bytes = 1 << 20;
        let r = PlacementRequest {
            tags: vec!["eu".into()],
            ..request()
        };
        let err = place(&r, &[candidate(&a), candidate(&b)]).unwrap_err();
        assert_eq!(err.excluded.len(), 2);
        let text = err.to_string();
        assert_eq!(
            text,
            "no host can take the sandbox in cluster `cls_default`: hst_a (hst_a-name): disconnected; \
             hst_b (hst_b-name): lacks tag `eu`, not enough memory (1 MiB available, 512 MiB needed)"
        );
        let none = place(&r, &[]).unwrap_err().to_string();
        assert!(none.contains("has no host"), "{none}");
    }

    #[test]
    fn explicit_host_is_the_only_one_considered() {
        let a = host("hst_a");
        let mut b = host("hst_b");
        b.status = HostStatus::Disconnected;
        let r = PlacementRequest {
            host_id: Some("hst_b".into()),
            ..request()
        };
        let err = place(&r, &[candidate(&a), candidate(&b)]).unwrap_err();
        assert_eq!(
            err.excluded,
            [(
                "hst_b".to_owned(),
                "hst_b-name".to_owned(),
                vec![Exclusion::Disconnected]
            )]
        );
        b.status = HostStatus::Connected;
        let placed = place(&r, &[candidate(&a), candidate(&b)]).unwrap();
        assert_eq!(placed.host_id, "hst_b");
    }

    #[test]
    fn prefers_cached_image_then_least_busy_then_memory() {
        let a = host("hst_a");
        let mut b = host("hst_b");
        b.telemetry.cached_images = vec!["gstacks-test/busybox:1".into()];
        let busy_b = Candidate {
            active_sandboxes: 2,
            ..candidate(&b)
        };
        let placed = place(&request(), &[candidate(&a), busy_b.clone()]).unwrap();
        assert_eq!(placed.host_id, "hst_b");
        assert!(placed.image_cached);

        // Without the image anywhere: the least busy.
        let busy_a = Candidate {
            active_sandboxes: 3,
            ..candidate(&a)
        };
        let other = PlacementRequest {
            image: "debian:13".into(),
            ..request()
        };
        let placed = place(&other, &[busy_a, busy_b]).unwrap();
        assert_eq!(placed.host_id, "hst_b");

        // Equal load: more available memory wins; then the lower id.
        let mut c = host("hst_c");
        c.telemetry.memory_available_bytes = 16 << 30;
        let placed = place(&other, &[candidate(&a), candidate(&c)]).unwrap();
        assert_eq!(placed.host_id, "hst_c");
        let d = host("hst_d");
        let placed = place(&other, &[candidate(&d), candidate(&a)]).unwrap();
        assert_eq!(placed.host_id, "hst_a");
    }

    #[test]
    fn cached_image_matching() {
        let mut h = host("hst_a");
        let digest = format!("sha256:{}", "d".repeat(64));
        h.telemetry.cached_images = vec![
            "sha256:abc".into(),
            "busybox:latest".into(),
            format!("busybox@{digest}"),
            "registry.example/app:1".into(),
            format!("registry.example/app@{digest}"),
        ];
        // Tags, with `latest` implied and Docker Hub's names shortened.
        assert!(image_cached(&h, "busybox"));
        assert!(image_cached(&h, "busybox:latest"));
        assert!(image_cached(&h, "docker.io/library/busybox"));
        assert!(image_cached(&h, "library/busybox:latest"));
        assert!(!image_cached(&h, "busybox:1"));
        assert!(image_cached(&h, "registry.example/app:1"));
        assert!(!image_cached(&h, "registry.example/app"));
        // The image id.
        assert!(image_cached(&h, "sha256:abc"));
        assert!(!image_cached(&h, "sha256:abd"));
        // Repository digests: the same repository and digest; a tag beside
        // the digest is ignored, as the engine does.
        assert!(image_cached(&h, &format!("busybox@{digest}")));
        assert!(image_cached(
            &h,
            &format!("docker.io/library/busybox@{digest}")
        ));
        assert!(image_cached(&h, &format!("busybox:1.36@{digest}")));
        assert!(image_cached(&h, &format!("registry.example/app@{digest}")));
        // The digest alone in another repository cannot be run without a
        // pull: not cached.
        assert!(!image_cached(&h, &format!("other.example/app@{digest}")));
        assert!(!image_cached(
            &h,
            &format!("busybox@sha256:{}", "e".repeat(64))
        ));
        // A digest is not a tag.
        assert!(!image_cached(
            &h,
            &format!("registry.example/app:{}", "d".repeat(64))
        ));
        assert!(!image_cached(&h, ""));
        // A registry port is not a tag.
        h.telemetry.cached_images = vec!["localhost:5000/app:latest".into()];
        assert!(image_cached(&h, "localhost:5000/app"));
        assert!(!image_cached(&h, "localhost/app"));
    }

    #[test]
    fn image_references_parse_as_the_engine_reads_them() {
        let r = |t| ImageRef::parse(t).map(|r| (r.repository, r.tag, r.digest));
        assert_eq!(r("busybox"), Some(("busybox", None, None)));
        assert_eq!(
            r("docker.io/library/busybox:1@sha256:x"),
            Some(("busybox", Some("1"), Some("sha256:x")))
        );
        assert_eq!(r("docker.io/me/app"), Some(("me/app", None, None)));
        assert_eq!(
            r("localhost:5000/library/app:2"),
            Some(("localhost:5000/library/app", Some("2"), None))
        );
        assert_eq!(r("sha256:abc"), None);
        assert_eq!(r(""), None);
    }
}
