//! The packaging test's crate: `tests/packages.rs` builds the Debian packages
//! (`scripts/package`), installs them into a throwaway root with `dpkg --root`, checks what
//! landed where, starts the installed daemons from their units' `ExecStart=` lines, and removes
//! and purges them again. This library holds what that test needs to read a unit as systemd does
//! (`systemd.syntax(7)`, `systemd.service(5)` "Command lines", `systemd.exec(5)`
//! `EnvironmentFile=`), as far as the shipped units use it — anything else is refused loudly, so
//! a unit that starts using more fails the test instead of being run differently from systemd.

use std::collections::BTreeMap;

/// A unit file: for each `[Section]`, each key's values in order (a key may repeat).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Unit {
    sections: BTreeMap<String, Vec<(String, String)>>,
}

impl Unit {
    /// Parses a unit file: `#`/`;` comment lines, `[Section]` headers, `Key=Value` (whitespace
    /// around both trimmed), a trailing backslash continuing the line (the backslash and the
    /// newline become a space; comment lines inside a continuation are skipped).
    pub fn parse(text: &str) -> Result<Unit, String> {
        let mut unit = Unit::default();
        let mut section: Option<String> = None;
        let mut pending = String::new();
        for (n, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            if pending.is_empty() && line.is_empty() {
                continue;
            }
            if let Some(head) = line.strip_suffix('\\') {
                pending.push_str(head);
                pending.push(' ');
                continue;
            }
            pending.push_str(line);
            let whole = std::mem::take(&mut pending);
            if whole.starts_with('[') {
                let name = whole
                    .strip_prefix('[')
                    .and_then(|s| s.strip_suffix(']'))
                    .ok_or_else(|| format!("line {}: a bad section header {whole:?}", n + 1))?;
                section = Some(name.to_string());
                continue;
            }
            let (key, value) = whole
                .split_once('=')
                .ok_or_else(|| format!("line {}: {whole:?} is no Key=Value", n + 1))?;
            let section = section
                .clone()
                .ok_or_else(|| format!("line {}: {key} outside any section", n + 1))?;
            unit.sections
                .entry(section)
                .or_default()
                .push((key.trim().to_string(), value.trim().to_string()));
        }
        Ok(unit)
    }

    /// Every value of `key` in `section`, in order.
    pub fn values(&self, section: &str, key: &str) -> Vec<&str> {
        self.sections
            .get(section)
            .into_iter()
            .flatten()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The one value of `key` in `section` (the last one, as systemd takes for single-valued
    /// settings), if any.
    pub fn value(&self, section: &str, key: &str) -> Option<&str> {
        self.values(section, key).last().copied()
    }
}

/// The variables of an `EnvironmentFile=`: `KEY=VALUE` lines, `#`/`;` comments and blank lines
/// skipped, a value in double quotes unquoted (with `\"`, `\\`, `\$`, `` \` `` unescaped) or in
/// single quotes taken as it is, an unquoted value trimmed.
pub fn environment_file(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut vars = vec![];
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| format!("line {}: {line:?} is no KEY=VALUE", n + 1))?;
        let key = key.trim();
        if !valid_name(key) {
            return Err(format!("line {}: {key:?} is no variable name", n + 1));
        }
        let value = value.trim();
        let value = if let Some(inner) = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
            let mut out = String::new();
            let mut chars = inner.chars();
            while let Some(c) = chars.next() {
                if c == '\\' {
                    match chars.next() {
                        Some(e @ ('"' | '\\' | '$' | '`')) => out.push(e),
                        Some(other) => {
                            out.push('\\');
                            out.push(other);
                        }
                        None => out.push('\\'),
                    }
                } else {
                    out.push(c);
                }
            }
            out
        } else if let Some(inner) = value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')) {
            inner.to_string()
        } else {
            value.to_string()
        };
        vars.push((key.to_string(), value));
    }
    Ok(vars)
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// What a command line's prefixes say (`systemd.service(5)`, table "Special executable
/// prefixes"). Only `-` (failure ignored) is accepted: `@`, `:`, `+`, `!`, `!!` change how the
/// command runs and none of the shipped units uses them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecCommand {
    /// The program and its arguments, as systemd passes them to `execve`.
    pub argv: Vec<String>,
    /// `-`: a failing exit status is not a failure of the unit.
    pub ignore_failure: bool,
}

/// The specifiers of a system unit `unit_name` (`systemd.unit(5)`, "Specifiers") that the test
/// can resolve without a running manager: `%%`, `%n`, `%N`, `%p`, `%i`/`%I` (empty: the units
/// are no templates), `%t` (`/run`), `%S` (`/var/lib`), `%C` (`/var/cache`), `%L`
/// (`/var/log`), `%E` (`/etc`), `%T` (`/tmp`), `%V` (`/var/tmp`). Any other is refused.
pub fn expand_specifiers(word: &str, unit_name: &str) -> Result<String, String> {
    let stem = unit_name
        .rsplit_once('.')
        .map_or(unit_name, |(stem, _)| stem);
    let mut out = String::new();
    let mut chars = word.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let s = chars
            .next()
            .ok_or_else(|| format!("{word:?} ends in a lone %"))?;
        out.push_str(match s {
            '%' => "%",
            'n' => unit_name,
            'N' | 'p' => stem,
            'i' | 'I' => "",
            't' => "/run",
            'S' => "/var/lib",
            'C' => "/var/cache",
            'L' => "/var/log",
            'E' => "/etc",
            'T' => "/tmp",
            'V' => "/var/tmp",
            other => {
                return Err(format!(
                    "%{other} in {word:?}: a specifier this test does not resolve; teach \
                     quiesce_packaging::expand_specifiers what systemd makes of it"
                ))
            }
        });
    }
    Ok(out)
}

/// Splits a command line into words as systemd does (`systemd.syntax(7)`, "Quoting"): words
/// separated by whitespace; a word, or a part of one, in double or single quotes keeps its
/// whitespace; C-style backslash escapes (`\"`, `\'`, `\\`, `\n`, `\t` …) outside single
/// quotes. systemd unquotes when it loads the unit, so a quoted `"$NAME"` is split like `$NAME`.
fn split_words(line: &str) -> Result<Vec<String>, String> {
    let mut words = vec![];
    let mut chars = line.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(words);
        }
        let mut word = String::new();
        let mut quote: Option<char> = None;
        while let Some(&c) = chars.peek() {
            if quote.is_none() && c.is_whitespace() {
                break;
            }
            chars.next();
            match (quote, c) {
                (None, '"' | '\'') => quote = Some(c),
                (Some(q), c) if c == q => quote = None,
                (Some('\''), c) => word.push(c),
                (_, '\\') => {
                    let e = chars
                        .next()
                        .ok_or_else(|| format!("{line:?} ends in a lone backslash"))?;
                    word.push(match e {
                        'n' => '\n',
                        't' => '\t',
                        'r' => '\r',
                        'a' => '\x07',
                        'b' => '\x08',
                        'f' => '\x0c',
                        'v' => '\x0b',
                        '\\' | '"' | '\'' => e,
                        other => {
                            return Err(format!(
                                "\\{other} in {line:?}: an escape this test does not decode"
                            ))
                        }
                    });
                }
                (_, c) => word.push(c),
            }
        }
        if quote.is_some() {
            return Err(format!("{line:?} has an unterminated quote"));
        }
        words.push(word);
    }
}

/// `${NAME}` replaced by the value of NAME (empty when unset) anywhere in a word, `$$` by `$`;
/// a `$` followed by anything else is kept as it is.
fn replace_braced(word: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = word;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(tail) = after.strip_prefix('{') {
            let end = tail
                .find('}')
                .ok_or_else(|| format!("{word:?}: an unterminated ${{"))?;
            let name = &tail[..end];
            if !valid_name(name) {
                return Err(format!(
                    "{word:?}: ${{{name}}} is a form this test does not expand"
                ));
            }
            out.push_str(&env(name).unwrap_or_default());
            rest = &tail[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// The command systemd runs for an `ExecStart=` value of the system unit `unit_name`, with
/// `env` the service's environment (`Environment=`, `EnvironmentFile=` and what the manager
/// sets): prefixes read, words split and unquoted, specifiers resolved
/// ([`expand_specifiers`]), then variables expanded — a word that is exactly `$NAME` becomes
/// the value of NAME split into words (zero or more; none when unset or empty; quotes in the
/// value kept together, as `systemd.service(5)`'s example `$TWO` with `TWO='two two' too`
/// gives "two two", "too"), `${NAME}` inside a word the exact value, in one word.
pub fn exec_command(
    value: &str,
    unit_name: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<ExecCommand, String> {
    let mut rest = value.trim_start();
    let mut ignore_failure = false;
    loop {
        match rest.chars().next() {
            Some('-') => ignore_failure = true,
            Some(p @ ('@' | ':' | '+' | '!')) => {
                return Err(format!(
                    "the prefix {p:?} of {value:?}: the test runs no command that way"
                ))
            }
            _ => break,
        }
        rest = &rest[1..];
    }
    let mut argv = vec![];
    for word in split_words(rest)? {
        let word = expand_specifiers(&word, unit_name)?;
        if word.strip_prefix('$').is_some_and(valid_name) {
            // Split as systemd splits it: at whitespace, quotes in the value kept together.
            argv.extend(split_words(&env(&word[1..]).unwrap_or_default())?);
        } else {
            argv.push(replace_braced(&word, env)?);
        }
    }
    match argv.first() {
        None => Err(format!("ExecStart={value:?} runs nothing")),
        Some(program) if !program.starts_with('/') => Err(format!(
            "ExecStart={value:?}: {program:?} is no absolute path (systemd would search its \
             fixed PATH; the shipped units name their programs)"
        )),
        Some(_) => Ok(ExecCommand {
            argv,
            ignore_failure,
        }),
    }
}

/// systemd's time spans (`systemd.time(7)`) as the units write them — `30s`, `2min`, `500ms`,
/// `1h 30min`, a bare number being seconds — in microseconds, as `$WATCHDOG_USEC` carries them.
pub fn timespan_usec(text: &str) -> Result<u64, String> {
    let mut total = 0u64;
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err("an empty time span".into());
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let number: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("{text:?} is no time span"))?;
        rest = rest[digits..].trim_start();
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c.is_whitespace())
            .unwrap_or(rest.len());
        let factor = match &rest[..unit_end] {
            "us" | "usec" => 1,
            "ms" | "msec" => 1_000,
            "" | "s" | "sec" | "second" | "seconds" => 1_000_000,
            "m" | "min" | "minute" | "minutes" => 60_000_000,
            "h" | "hr" | "hour" | "hours" => 3_600_000_000,
            other => return Err(format!("{other:?} in {text:?} is no time unit")),
        };
        total += number * factor;
        rest = rest[unit_end..].trim_start();
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn units_parse_with_comments_repeats_and_continuations() {
        let unit = Unit::parse(
            "# a comment\n[Unit]\nDescription = a unit\n\n[Service]\n; another\n\
             ExecStart=/usr/bin/x \\\n  --a b\nEnvironment=A=1\nEnvironment=B=2\n",
        )
        .unwrap();
        assert_eq!(unit.value("Unit", "Description"), Some("a unit"));
        assert_eq!(
            unit.value("Service", "ExecStart"),
            Some("/usr/bin/x  --a b")
        );
        assert_eq!(unit.values("Service", "Environment"), ["A=1", "B=2"]);
        assert!(Unit::parse("Key=outside\n").is_err());
    }

    #[test]
    fn command_lines_split_quote_and_expand_as_systemd_does() {
        let vars = [
            ("ARGS", "--listen 1.2.3.4:5  -v"),
            ("EMPTY", ""),
            ("ONE", "a b"),
            ("TWO", "'two two' too"),
        ];
        let e = env(&vars);
        let run = |line: &str| exec_command(line, "quiesce-x.service", &e).map(|c| c.argv);
        assert_eq!(
            run("/usr/bin/x --config /etc/x.toml $ARGS").unwrap(),
            [
                "/usr/bin/x",
                "--config",
                "/etc/x.toml",
                "--listen",
                "1.2.3.4:5",
                "-v"
            ]
        );
        // Unset and empty `$NAME`: no word at all; `${NAME}`: one word, whitespace kept.
        assert_eq!(run("/usr/bin/x $EMPTY $UNSET").unwrap(), ["/usr/bin/x"]);
        assert_eq!(
            run("/usr/bin/x --n=${ONE} ${UNSET}").unwrap(),
            ["/usr/bin/x", "--n=a b", ""]
        );
        // Quotes keep whitespace (and are gone before the expansion); `$$` is a dollar;
        // escapes decode; a value's quotes hold its words together.
        assert_eq!(
            run(r#"/usr/bin/x "a  b" "$ONE" $$ONE --x=$ONE a\tb $TWO"#).unwrap(),
            [
                "/usr/bin/x",
                "a  b",
                "a",
                "b",
                "$ONE",
                "--x=$ONE",
                "a\tb",
                "two two",
                "too"
            ]
        );
        assert_eq!(
            run("/usr/bin/x %n %N %t/x %%").unwrap(),
            [
                "/usr/bin/x",
                "quiesce-x.service",
                "quiesce-x",
                "/run/x",
                "%"
            ]
        );
        let ignoring = exec_command("-/usr/bin/x", "x.service", &e).unwrap();
        assert!(ignoring.ignore_failure);
        for refused in [
            "/usr/bin/x %H",
            "@/usr/bin/x y",
            "+/usr/bin/x",
            "x --relative",
            "/usr/bin/x \"open",
            "/usr/bin/x ${A:-b}",
        ] {
            assert!(run(refused).is_err(), "{refused}");
        }
    }

    #[test]
    fn environment_files_and_time_spans() {
        let vars =
            environment_file("# c\nA=\"x \\\"y\\\"\"\nB='--z  w'\n  C = plain  \nD=\n").unwrap();
        let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(
            vars,
            [("A", "x \"y\""), ("B", "--z  w"), ("C", "plain"), ("D", "")]
        );
        assert!(environment_file("no equals\n").is_err());
        assert_eq!(timespan_usec("30s"), Ok(30_000_000));
        assert_eq!(timespan_usec("1min 30s"), Ok(90_000_000));
        assert_eq!(timespan_usec("500ms"), Ok(500_000));
        assert_eq!(timespan_usec("5"), Ok(5_000_000));
        assert!(timespan_usec("3 fortnights").is_err());
    }
}
