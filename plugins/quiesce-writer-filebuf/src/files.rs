//! The application's files: literal paths and glob patterns, fsynced at prepare (before the
//! freeze, so that little is left for the snapshot to flush).

use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};

/// One entry of `files`: a path, or a glob pattern (when it holds `*`, `?` or `[`).
#[derive(Debug, Clone)]
pub enum FileSpec {
    Path(PathBuf),
    Glob(String),
}

impl FileSpec {
    /// Checks an entry of the configuration: absolute, and a valid pattern if it is one.
    pub fn parse(entry: &str) -> Result<FileSpec, String> {
        if !entry.starts_with('/') {
            return Err(format!(
                "{entry:?} is not an absolute path: write paths and patterns from `/`"
            ));
        }
        if entry.contains(['*', '?', '[']) {
            glob::Pattern::new(entry)
                .map_err(|e| format!("{entry:?} is not a valid glob pattern: {e}"))?;
            Ok(FileSpec::Glob(entry.to_string()))
        } else {
            Ok(FileSpec::Path(PathBuf::from(entry)))
        }
    }
}

/// The files `specs` name now: every literal path (which must exist) and whatever the patterns
/// match (possibly nothing), without duplicates.
pub fn resolve(specs: &[FileSpec]) -> Result<BTreeSet<PathBuf>, String> {
    let mut files = BTreeSet::new();
    for spec in specs {
        match spec {
            FileSpec::Path(path) => {
                if !path.exists() {
                    return Err(format!(
                        "{} does not exist: the application has not created it, or `files` names the wrong path",
                        path.display()
                    ));
                }
                files.insert(path.clone());
            }
            FileSpec::Glob(pattern) => {
                let paths = glob::glob(pattern).map_err(|e| format!("pattern {pattern:?}: {e}"))?;
                for path in paths {
                    files.insert(path.map_err(|e| format!("pattern {pattern:?}: {e}"))?);
                }
            }
        }
    }
    Ok(files)
}

/// fsyncs each file (opened read-only: these are plain files, not databases) and the
/// directories holding them, so that new files' directory entries are durable too. Returns how
/// many files were synced.
pub fn sync(files: &BTreeSet<PathBuf>) -> Result<usize, String> {
    let dirs: BTreeSet<&Path> = files.iter().filter_map(|f| f.parent()).collect();
    for path in files.iter().map(PathBuf::as_path).chain(dirs) {
        File::open(path)
            .and_then(|f| f.sync_all())
            .map_err(|e| format!("cannot fsync {}: {e}", path.display()))?;
    }
    Ok(files.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_paths_must_exist_and_patterns_may_match_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().display();
        std::fs::write(tmp.path().join("a.log"), "a").unwrap();
        std::fs::write(tmp.path().join("b.log"), "b").unwrap();
        let specs = [
            FileSpec::parse(&format!("{dir}/a.log")).unwrap(),
            FileSpec::parse(&format!("{dir}/*.log")).unwrap(),
            FileSpec::parse(&format!("{dir}/*.none")).unwrap(),
        ];
        let files = resolve(&specs).unwrap();
        assert_eq!(files.len(), 2);
        assert_eq!(sync(&files).unwrap(), 2);

        let missing = [FileSpec::parse(&format!("{dir}/missing.log")).unwrap()];
        let e = resolve(&missing).unwrap_err();
        assert!(e.contains("missing.log does not exist"), "{e}");
        assert!(FileSpec::parse("relative.log").is_err());
        assert!(FileSpec::parse("/x/[.log").is_err());
    }
}
