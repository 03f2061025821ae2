//! The repository table: one row per cached (mirrored) and hosted repository, filtered, sorted
//! and paged. Building the rows reads what the footprint and the counters already hold, so a
//! listing of 10,000 repositories costs a few milliseconds (see the test below).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::model::{api_name, internal, pull_name};
use super::{ApiError, Console};
use crate::cache::stats::{CounterValues, Footprint, RepoKey, HOSTED};

/// One repository of the table.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct RepoRow {
    /// The API's name: `<upstream host>/<repository>`, or the hosted repository.
    pub name: String,
    /// `mirrored` or `hosted`.
    pub kind: &'static str,
    /// The upstream host (`hosted` for hosted repositories).
    pub upstream: String,
    pub repository: String,
    /// What a client pulls through this mirror (without the mirror's host).
    pub pull: String,
    pub size_bytes: u64,
    /// Of `size_bytes`, blobs other repositories reference too.
    pub shared_bytes: u64,
    pub blobs: u64,
    pub manifests: u64,
    pub tags: u64,
    pub pinned: bool,
    pub pulls: u64,
    pub bytes_served: u64,
    pub bytes_fetched: u64,
    pub last_pulled: Option<u64>,
    pub first_cached: Option<u64>,
}

/// `?sort=size|pulls|last_pulled|name&order=asc|desc&q=&n=&last=`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ListParams {
    pub sort: Option<String>,
    pub order: Option<String>,
    pub q: Option<String>,
    pub n: Option<usize>,
    pub last: Option<String>,
}

/// A page of the table.
#[derive(Clone, Debug, Serialize)]
pub struct Page {
    pub repositories: Vec<RepoRow>,
    /// Rows matching `q`, on every page.
    pub total: usize,
    /// `last` for the next page, when there is one.
    pub next: Option<String>,
    pub sort: String,
    pub order: String,
}

/// Rows per page unless `n` says otherwise, and at most.
pub const DEFAULT_PAGE: usize = 100;
pub const MAX_PAGE: usize = 1000;

/// Filters, sorts and pages `rows`. Numbers sort largest (latest) first unless `order=asc`,
/// names A to Z; ties by name. `last` is the name of the last row of the previous page.
pub fn list(mut rows: Vec<RepoRow>, p: &ListParams) -> Result<Page, String> {
    let sort = p.sort.as_deref().unwrap_or("size");
    let key: fn(&RepoRow) -> u64 = match sort {
        "size" => |r| r.size_bytes,
        "pulls" => |r| r.pulls,
        "last_pulled" => |r| r.last_pulled.unwrap_or(0),
        "name" => |_| 0,
        other => {
            return Err(format!(
                "sort={other}: use size, pulls, last_pulled or name"
            ))
        }
    };
    let desc = match p.order.as_deref() {
        None => sort != "name",
        Some("desc") => true,
        Some("asc") => false,
        Some(other) => return Err(format!("order={other}: use asc or desc")),
    };
    if let Some(q) =
        p.q.as_deref()
            .map(str::to_lowercase)
            .filter(|q| !q.is_empty())
    {
        rows.retain(|r| r.name.to_lowercase().contains(&q));
    }
    rows.sort_unstable_by(|a, b| {
        let by = key(a).cmp(&key(b)).then_with(|| a.name.cmp(&b.name));
        if desc {
            key(b).cmp(&key(a)).then_with(|| a.name.cmp(&b.name))
        } else {
            by
        }
    });
    let total = rows.len();
    let start = match p.last.as_deref() {
        None | Some("") => 0,
        Some(last) => {
            rows.iter()
                .position(|r| r.name == last)
                .ok_or_else(|| format!("last={last}: no such repository in this listing"))?
                + 1
        }
    };
    let n = p.n.unwrap_or(DEFAULT_PAGE).min(MAX_PAGE);
    let end = (start + n).min(total);
    let page: Vec<RepoRow> = rows.drain(start.min(end)..end).collect();
    let next = (end < total && !page.is_empty())
        .then(|| page.last().map(|r| r.name.clone()))
        .flatten();
    Ok(Page {
        repositories: page,
        total,
        next,
        sort: sort.to_owned(),
        order: if desc { "desc" } else { "asc" }.to_owned(),
    })
}

/// The rows of the cache's repositories.
pub fn mirrored_rows(
    f: &Footprint,
    counters: &HashMap<RepoKey, CounterValues>,
    pull: impl Fn(&RepoKey) -> String,
) -> Vec<RepoRow> {
    f.repos
        .iter()
        .map(|(key, r)| {
            let c = counters.get(key).copied().unwrap_or_default();
            RepoRow {
                name: api_name(key),
                kind: "mirrored",
                upstream: key.0.clone(),
                repository: key.1.clone(),
                pull: pull(key),
                size_bytes: r.size.bytes,
                shared_bytes: r.size.shared_bytes,
                blobs: r.size.blobs,
                manifests: r.size.manifests,
                tags: r.tags,
                pinned: r.size.pinned,
                pulls: c.pulls,
                bytes_served: c.bytes_served,
                bytes_fetched: c.bytes_fetched,
                last_pulled: (c.last_pulled > 0).then_some(c.last_pulled),
                first_cached: (r.first_cached > 0).then_some(r.first_cached),
            }
        })
        .collect()
}

/// The rows of the hosted repositories (from the local hosted index).
fn hosted_rows(
    c: &Console,
    counters: &HashMap<RepoKey, CounterValues>,
) -> Result<Vec<RepoRow>, ApiError> {
    let Some(h) = &c.hosted else {
        return Ok(Vec::new());
    };
    let idx = h.index();
    let blob_sizes: HashMap<String, u64> = idx
        .blobs()
        .map_err(internal)?
        .into_iter()
        .map(|(d, s)| (d.hex().to_owned(), s))
        .collect();
    let manifest_sizes: HashMap<String, u64> = idx
        .manifest_sizes()
        .map_err(internal)?
        .into_iter()
        .collect();
    let mut rows: HashMap<String, RepoRow> = HashMap::new();
    for (repo, hex, _) in idx.all_links().map_err(internal)? {
        let r = hosted_row(c, &mut rows, counters, &repo);
        r.size_bytes += blob_sizes.get(&hex).copied().unwrap_or(0);
        r.blobs += 1;
    }
    for (repo, hex, at) in idx.all_mlinks().map_err(internal)? {
        let r = hosted_row(c, &mut rows, counters, &repo);
        r.size_bytes += manifest_sizes.get(&hex).copied().unwrap_or(0);
        r.manifests += 1;
        if r.first_cached.is_none_or(|f| at > 0 && at < f) {
            r.first_cached = (at > 0).then_some(at);
        }
    }
    for (repo, _, _) in idx.all_tags().map_err(internal)? {
        hosted_row(c, &mut rows, counters, &repo).tags += 1;
    }
    Ok(rows.into_values().collect())
}

fn hosted_row<'a>(
    c: &Console,
    rows: &'a mut HashMap<String, RepoRow>,
    counters: &HashMap<RepoKey, CounterValues>,
    repo: &str,
) -> &'a mut RepoRow {
    rows.entry(repo.to_owned()).or_insert_with(|| {
        let key = (HOSTED.to_owned(), repo.to_owned());
        let cv = counters.get(&key).copied().unwrap_or_default();
        RepoRow {
            name: repo.to_owned(),
            kind: "hosted",
            upstream: HOSTED.to_owned(),
            repository: repo.to_owned(),
            pull: pull_name(c, &key),
            pulls: cv.pulls,
            bytes_served: cv.bytes_served,
            last_pulled: (cv.last_pulled > 0).then_some(cv.last_pulled),
            ..RepoRow::default()
        }
    })
}

/// Every row: the cache's repositories and the hosted ones. Blocking.
pub(crate) fn all(c: &Console) -> Result<Vec<RepoRow>, ApiError> {
    let cache = &c.mirror.cache;
    let f = cache.footprint().map_err(internal)?;
    let counters = cache.activity().repos();
    let mut rows = mirrored_rows(&f, &counters, |k| pull_name(c, k));
    rows.extend(hosted_rows(c, &counters)?);
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::stats::{RepoSize, Size};

    fn footprint(n: usize) -> (Footprint, HashMap<RepoKey, CounterValues>) {
        let mut f = Footprint::default();
        let mut counters = HashMap::new();
        for i in 0..n {
            let key = ("docker.io".to_string(), format!("org{}/app{i:05}", i % 97));
            f.repos.insert(
                key.clone(),
                RepoSize {
                    size: Size {
                        bytes: (i as u64 * 7919) % 100_003,
                        blobs: 3,
                        manifests: 1,
                        ..Size::default()
                    },
                    tags: 1,
                    first_cached: 1,
                },
            );
            counters.insert(
                key,
                CounterValues {
                    pulls: (i as u64 * 31) % 1000,
                    last_pulled: 1_700_000_000 + i as u64,
                    ..CounterValues::default()
                },
            );
        }
        (f, counters)
    }

    fn params(sort: &str, q: &str, n: usize, last: Option<&str>) -> ListParams {
        ListParams {
            sort: Some(sort.into()),
            order: None,
            q: (!q.is_empty()).then(|| q.into()),
            n: Some(n),
            last: last.map(Into::into),
        }
    }

    #[test]
    fn pages_follow_the_sort_and_cover_every_row_once() {
        let (f, counters) = footprint(2500);
        let rows = mirrored_rows(&f, &counters, |k| k.1.clone());
        let mut seen = Vec::new();
        let mut last: Option<String> = None;
        loop {
            let page = list(rows.clone(), &params("size", "", 700, last.as_deref())).unwrap();
            assert_eq!(page.total, 2500);
            seen.extend(
                page.repositories
                    .iter()
                    .map(|r| (r.size_bytes, r.name.clone())),
            );
            match page.next {
                Some(n) => last = Some(n),
                None => break,
            }
        }
        assert_eq!(seen.len(), 2500);
        assert!(seen
            .windows(2)
            .all(|w| w[0].0 > w[1].0 || (w[0].0 == w[1].0 && w[0].1 < w[1].1)));
        let page = list(rows.clone(), &params("pulls", "APP0001", 1000, None)).unwrap();
        assert_eq!(page.total, 10, "app00010..app00019, case-insensitive");
        assert!(page
            .repositories
            .windows(2)
            .all(|w| w[0].pulls >= w[1].pulls));
        let page = list(rows.clone(), &params("name", "", 3, None)).unwrap();
        assert_eq!(page.order, "asc");
        assert!(page.repositories[0].name < page.repositories[1].name);
        assert!(list(rows.clone(), &params("colour", "", 3, None)).is_err());
        assert!(list(rows, &params("size", "", 3, Some("nope"))).is_err());
    }

    /// The listing of a 10,000-repository cache, from the footprint and counters in memory:
    /// a few milliseconds in a release build, some tens in a debug one (printed, not asserted,
    /// so that a busy machine cannot fail it).
    #[test]
    fn ten_thousand_repositories_are_listed_from_memory() {
        let (f, counters) = footprint(10_000);
        let start = std::time::Instant::now();
        let rows = mirrored_rows(&f, &counters, |k| k.1.clone());
        let page = list(rows, &params("last_pulled", "", 100, None)).unwrap();
        let took = start.elapsed();
        println!("10,000 repositories listed in {took:?}");
        assert_eq!(page.total, 10_000);
        assert_eq!(page.repositories.len(), 100);
        assert_eq!(
            page.repositories[0].last_pulled,
            Some(1_700_000_000 + 9_999)
        );
    }
}
