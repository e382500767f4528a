//! The two ways a quiesce writer asks this application to flush and hold still, exactly as the
//! `filebuf` writer's README documents them (`plugins/quiesce-writer-filebuf/README.md`):
//!
//! - the **control socket**: one line per request, one line per answer —
//!   `FREEZE <set-id>` → `FROZEN <last-record>` | `ERROR <reason>`; `THAW <set-id>` → `THAWED`.
//!   A hold belongs to the connection that asked for it: when that connection closes, its hold
//!   ends.
//! - **signals** (`--signal-mode`): the freeze signal holds and flushes, then the answer
//!   `FROZEN <set-id> <last-record>` replaces the ack file (written beside it, then renamed);
//!   the thaw signal ends the hold and answers `THAWED <set-id>`. The set id is the second word
//!   of the request the writer left in the ack file before signalling.

use crate::records::{log, Holder, Records, SIGNAL_HOLDER};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The longest request line accepted (the set id included).
const MAX_LINE: u64 = 4096;

/// Accepts control connections for ever, one thread each. Holders are numbered from 1.
pub fn serve(listener: UnixListener, records: Arc<Records>) {
    let mut next: Holder = SIGNAL_HOLDER;
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                next += 1;
                let (records, holder) = (records.clone(), next);
                let spawned = std::thread::Builder::new()
                    .name(format!("control-{holder}"))
                    .spawn(move || connection(stream, holder, &records));
                if let Err(e) = spawned {
                    log(&format!(
                        "cannot start a thread for a control connection: {e}"
                    ));
                }
            }
            Err(e) => log(&format!("accepting a control connection failed: {e}")),
        }
    }
}

/// Serves one connection until it closes; a hold it still has then ends.
fn connection(stream: UnixStream, holder: Holder, records: &Records) {
    let mut reader = BufReader::new(&stream);
    let mut writer = &stream;
    loop {
        let mut line = String::new();
        let read = (&mut reader).take(MAX_LINE + 1).read_line(&mut line);
        let answer = match read {
            Ok(0) => break,
            Ok(_) if !line.ends_with('\n') => {
                // Too long, or cut short by the peer: answer once and drop the connection.
                let _ = writer.write_all(b"ERROR request line too long or not terminated\n");
                break;
            }
            Ok(_) => answer(line.trim_end_matches(['\n', '\r']), holder, records),
            Err(e) => {
                log(&format!("control connection {holder}: {e}"));
                break;
            }
        };
        if let Err(e) = writer.write_all(format!("{answer}\n").as_bytes()) {
            log(&format!("control connection {holder}: cannot answer: {e}"));
            break;
        }
    }
    if records.thaw(holder) {
        log(&format!(
            "control connection {holder} closed while holding writes: resuming"
        ));
    }
}

fn answer(line: &str, holder: Holder, records: &Records) -> String {
    let mut words = line.split_ascii_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some("FREEZE"), Some(set), None) => match records.freeze(holder) {
            Ok(last) => {
                log(&format!("frozen for {set} at record {last}"));
                format!("FROZEN {last}")
            }
            Err(e) => format!("ERROR {}", one_line(&format!("{e:#}"))),
        },
        (Some("THAW"), Some(set), None) => {
            if records.thaw(holder) {
                log(&format!("thawed after {set}"));
            }
            "THAWED".into()
        }
        _ => format!("ERROR unknown request {:?}", one_line(line)),
    }
}

fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

/// The ack file of the signal interface.
pub struct AckFile {
    path: PathBuf,
    temp: PathBuf,
}

impl AckFile {
    pub fn new(path: &Path) -> AckFile {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "ack".into());
        AckFile {
            path: path.to_path_buf(),
            temp: path.with_file_name(format!(".{name}.app-tmp")),
        }
    }

    /// The set id of the request the writer left in the file, or `-` when there is none.
    fn set_id(&self) -> String {
        std::fs::read_to_string(&self.path)
            .ok()
            .and_then(|text| {
                let first = text.lines().next()?.to_string();
                first.split_ascii_whitespace().nth(1).map(str::to_string)
            })
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "-".into())
    }

    /// Replaces the file with `line`: written beside it, then renamed over it.
    fn answer(&self, line: &str) {
        let result = std::fs::write(&self.temp, format!("{line}\n"))
            .and_then(|()| std::fs::rename(&self.temp, &self.path));
        if let Err(e) = result {
            log(&format!(
                "cannot write the answer {line:?} to {}: {e}",
                self.path.display()
            ));
        }
    }

    /// The freeze signal arrived.
    pub fn freeze(&self, records: &Records) {
        let set = self.set_id();
        match records.freeze(SIGNAL_HOLDER) {
            Ok(last) => {
                log(&format!("frozen by signal for {set} at record {last}"));
                self.answer(&format!("FROZEN {set} {last}"));
            }
            Err(e) => self.answer(&format!("ERROR {set} {}", one_line(&format!("{e:#}")))),
        }
    }

    /// The thaw signal arrived.
    pub fn thaw(&self, records: &Records) {
        let set = self.set_id();
        if records.thaw(SIGNAL_HOLDER) {
            log(&format!("thawed by signal after {set}"));
        }
        self.answer(&format!("THAWED {set}"));
    }
}
