//! Startup benchmark: how long `Cache::open` takes (lock, tmp wipe, reconcile of index and
//! files, loading sizes and recency) with N cached blobs.
//!
//! `cargo run --release --example startup_bench -- 100000 [DIR]`
//! Builds (once) a cache of N tiny blobs with index and access records in DIR (default: a temp
//! dir), then opens it three times and prints each duration. Results go in BENCHMARKS.md.

use std::path::PathBuf;
use std::time::Instant;

use stowage::cache::{index::unix_now, BlobMeta, Cache, Index};
use stowage::config::Config;
use stowage::oci::Digest;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let n: u64 = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(100_000);
    let keep;
    let dir: PathBuf = match args.next() {
        Some(d) => PathBuf::from(d),
        None => {
            keep = tempfile_dir()?;
            keep.clone()
        }
    };
    let mut config = Config::from_toml("")?;
    config.storage.path = dir.clone();
    if !dir.join("index").exists() {
        let t = Instant::now();
        let index = Index::open(&dir.join("index"))?;
        let mut access = Vec::new();
        for i in 0..n {
            let bytes = i.to_le_bytes();
            let d = Digest::of(&bytes);
            let p = dir.join("blobs/sha256").join(&d.hex()[..2]);
            std::fs::create_dir_all(&p)?;
            std::fs::write(p.join(d.hex()), bytes)?;
            index.put_blob(
                &d,
                &BlobMeta {
                    size: 8,
                    added: unix_now(),
                },
            )?;
            let mut k = vec![b'b'];
            k.extend_from_slice(d.hex().as_bytes());
            access.push((k, Some((i + 1, unix_now()))));
        }
        index.write_access(access.iter().map(|(k, v)| (k, v)))?;
        index.flush()?;
        println!("built {n} blobs in {:?}", t.elapsed());
    }
    for run in 1..=3 {
        let t = Instant::now();
        let cache = Cache::open(&config.storage)?;
        let e = t.elapsed();
        println!(
            "open #{run}: {e:?} ({} blobs, {} bytes)",
            cache.stats().blob_count,
            cache.stats().blob_bytes
        );
    }
    Ok(())
}

fn tempfile_dir() -> std::io::Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("stowage-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
