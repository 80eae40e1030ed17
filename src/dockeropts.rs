//! `mk-docker-opts.sh`: Docker daemon options from subnet.env, as upstream's
//! script of that name writes them (flannel-rs runs this when invoked under that
//! name: the image links `/opt/bin/mk-docker-opts.sh` to flanneld).
//!
//! Same flags (`-f -d -i -c -k -m`), same output file, byte for byte: one
//! `DOCKER_OPT_<NAME>="value"` line per option (sorted by name, including any
//! `DOCKER_OPT_*` already in the environment), then `<KEY>="<existing $KEY> opt opt "`.
//! Upstream's script *sources* subnet.env; this reads its `KEY=VALUE` lines, with
//! the environment underneath, which is the same for every file flanneld writes.
//! One deliberate difference: upstream's getopts string lacks `m`, so its `-m`
//! prints the usage and exits 1; here `-m` does what the usage says (no `--ip-masq`).

use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opts {
    pub flannel_env: PathBuf,
    pub docker_env: PathBuf,
    pub key: String,
    pub individual: bool,
    pub combined: bool,
    pub ipmasq: bool,
}

pub fn usage(argv0: &str) -> String {
    format!(
        "{argv0} [-f FLANNEL-ENV-FILE] [-d DOCKER-ENV-FILE] [-i] [-c] [-m] [-k COMBINED-KEY]

Generate Docker daemon options based on flannel env file
OPTIONS:
\t-f\tPath to flannel env file. Defaults to /run/flannel/subnet.env
\t-d\tPath to Docker env file to write to. Defaults to /run/docker_opts.env
\t-i\tOutput each Docker option as individual var. e.g. DOCKER_OPT_MTU=1500
\t-c\tOutput combined Docker options into DOCKER_OPTS var
\t-k\tSet the combined options key to this value (default DOCKER_OPTS=)
\t-m\tDo not output --ip-masq (useful for older Docker version)
"
    )
}

/// POSIX getopts over "f:d:ick:m": clustered flags, values attached or next,
/// `--` and the first non-option end the options.
pub fn parse_args(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        flannel_env: "/run/flannel/subnet.env".into(),
        docker_env: "/run/docker_opts.env".into(),
        key: "DOCKER_OPTS".into(),
        individual: false,
        combined: false,
        ipmasq: true,
    };
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        if a == "--" || !a.starts_with('-') || a == "-" {
            break;
        }
        let chars: Vec<char> = a[1..].chars().collect();
        let mut j = 0;
        while j < chars.len() {
            let c = chars[j];
            match c {
                'i' => o.individual = true,
                'c' => o.combined = true,
                'm' => o.ipmasq = false,
                'f' | 'd' | 'k' => {
                    let rest: String = chars[j + 1..].iter().collect();
                    let value = if !rest.is_empty() {
                        rest
                    } else {
                        i += 1;
                        args.get(i)
                            .cloned()
                            .ok_or_else(|| format!("option requires an argument -- {c}"))?
                    };
                    match c {
                        'f' => o.flannel_env = value.into(),
                        'd' => o.docker_env = value.into(),
                        _ => o.key = value,
                    }
                    break;
                }
                _ => return Err(format!("illegal option -- {c}")),
            }
            j += 1;
        }
        i += 1;
    }
    if !o.individual && !o.combined {
        o.individual = true;
        o.combined = true;
    }
    Ok(o)
}

/// `KEY=VALUE` lines of an env file (values may be quoted); the rest is ignored.
pub fn read_env_file(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            let l = l.strip_prefix("export ").unwrap_or(l);
            let (k, v) = l.split_once('=')?;
            let valid = !k.is_empty()
                && !k.starts_with(|c: char| c.is_ascii_digit())
                && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid || l.starts_with('#') {
                return None;
            }
            let v = v.trim();
            let v = ['"', '\'']
                .iter()
                .find_map(|q| v.strip_prefix(*q).and_then(|r| r.strip_suffix(*q)))
                .unwrap_or(v);
            Some((k.to_string(), v.to_string()))
        })
        .collect()
}

/// The output file's text. `vars`: the environment with the env file's
/// variables on top (as after `source`).
pub fn render(o: &Opts, vars: &BTreeMap<String, String>) -> String {
    let get = |k: &str| vars.get(k).map(String::as_str).unwrap_or("");
    let mut opts: BTreeMap<String, String> = vars
        .iter()
        .filter(|(k, _)| k.starts_with("DOCKER_OPT_"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if !get("FLANNEL_SUBNET").is_empty() {
        opts.insert(
            "DOCKER_OPT_BIP".into(),
            format!("--bip={}", get("FLANNEL_SUBNET")),
        );
    }
    if !get("FLANNEL_MTU").is_empty() {
        opts.insert(
            "DOCKER_OPT_MTU".into(),
            format!("--mtu={}", get("FLANNEL_MTU")),
        );
    }
    if get("FLANNEL_IPMASQ") == "true" && o.ipmasq {
        opts.insert("DOCKER_OPT_IPMASQ".into(), "--ip-masq=false".into());
    }
    let mut out = String::new();
    let mut combined = format!("{} ", get(&o.key));
    for (k, v) in &opts {
        if o.individual {
            out.push_str(&format!("{k}=\"{v}\"\n"));
        }
        combined.push_str(v);
        combined.push(' ');
    }
    if o.combined {
        out.push_str(&format!("{}=\"{combined}\"\n", o.key));
    }
    out
}

/// Runs as `mk-docker-opts.sh`; returns the exit code.
pub fn main(argv0: &str, args: &[String]) -> i32 {
    let o = match parse_args(args) {
        Ok(o) => o,
        Err(why) => {
            eprint!("{argv0}: {why}\n{}", usage(argv0));
            return 1;
        }
    };
    let mut vars: BTreeMap<String, String> = std::env::vars().collect();
    match std::fs::read_to_string(&o.flannel_env) {
        Ok(text) => vars.extend(read_env_file(&text)),
        // Upstream goes on without the file (its options then come from the environment).
        Err(e) => eprintln!("{argv0}: warning: {}: {e}", o.flannel_env.display()),
    }
    if let Err(e) = write_atomic(std::path::Path::new(&o.docker_env), &render(&o, &vars)) {
        eprintln!("{argv0}: writing {}: {e}", o.docker_env.display());
        return 1;
    }
    0
}

/// Writes `text` to `path` through a temporary file in the same directory and
/// a rename, so a reader (docker's EnvironmentFile) sees the old file or the
/// new one, never a partial one.
pub fn write_atomic(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let r = (|| {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn getopts_forms() {
        let o = parse_args(&args("-ic -kNET -f /x/subnet.env -d/y/opts")).unwrap();
        assert!(o.individual && o.combined && o.ipmasq);
        assert_eq!(o.key, "NET");
        assert_eq!(o.flannel_env, PathBuf::from("/x/subnet.env"));
        assert_eq!(o.docker_env, PathBuf::from("/y/opts"));
        let o = parse_args(&args("-c")).unwrap();
        assert!(o.combined && !o.individual);
        let o = parse_args(&args("-m")).unwrap();
        assert!(!o.ipmasq && o.individual && o.combined);
        assert!(parse_args(&args("-x")).is_err());
        assert!(parse_args(&args("-f")).is_err());
        // Options end at the first operand.
        assert!(parse_args(&args("-c stray -x")).is_ok());
    }

    #[test]
    fn env_file_lines() {
        let v = read_env_file(
            "# c\nFLANNEL_MTU=1450\nexport FLANNEL_SUBNET=\"10.1.2.1/24\"\n1BAD=x\nnoequals\n",
        );
        assert_eq!(v.len(), 2);
        assert_eq!(v["FLANNEL_SUBNET"], "10.1.2.1/24");
    }

    #[test]
    fn minus_m_leaves_out_ip_masq() {
        let vars =
            read_env_file("FLANNEL_SUBNET=10.1.2.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n");
        let o = parse_args(&args("-m -c")).unwrap();
        assert_eq!(
            render(&o, &vars),
            "DOCKER_OPTS=\" --bip=10.1.2.1/24 --mtu=1450 \"\n"
        );
    }

    #[test]
    fn a_reader_never_sees_a_partial_file() {
        let dir = tempfile::tempdir().unwrap();
        let env = dir.path().join("subnet.env");
        std::fs::write(
            &env,
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n",
        )
        .unwrap();
        let out = dir.path().join("docker_opts.env");
        // Two outputs of different lengths, alternately.
        let argv = |n: u32| -> Vec<String> {
            let mut a = vec!["-f", env.to_str().unwrap(), "-d", out.to_str().unwrap()];
            if n % 2 == 1 {
                a.push("-c");
            }
            a.iter().map(|s| s.to_string()).collect()
        };
        assert_eq!(main("mk-docker-opts.sh", &argv(0)), 0);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (out, stop) = (out.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut bad = 0;
                let mut reads = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && reads < 200_000 {
                    reads += 1;
                    match std::fs::read_to_string(&out) {
                        Ok(t) if t.ends_with('\n') && t.contains("--mtu=1450") => {}
                        _ => bad += 1,
                    }
                }
                bad
            })
        };
        for n in 0..2000 {
            assert_eq!(main("mk-docker-opts.sh", &argv(n)), 0);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(
            reader.join().unwrap(),
            0,
            "a reader saw a missing or partial file"
        );
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }
}
