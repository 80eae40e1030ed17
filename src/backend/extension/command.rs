//! Running one extension command: `sh -c` (upstream v0.20.2's contract: the
//! net-conf examples use pipes, `export` and `&&`), the lease data in the
//! environment, stdin fed, stdout and stderr captured together, and bounded in
//! time — a command still running at the deadline is killed with its whole
//! process group.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

/// Most of a command's output kept for logs and errors.
const LOG_OUTPUT: usize = 1024;

/// Why a command did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("could not start sh: {0}")]
    Spawn(String),
    #[error("timed out after {0:?} and was killed")]
    Timeout(Duration),
    #[error("{status}: {output}")]
    Failed { status: String, output: String },
}

/// Runs `cmd` with `env` added to the agent's environment and `stdin` (plus a
/// newline, as upstream) on its standard input. Returns the combined output,
/// trimmed.
pub async fn run(
    cmd: &str,
    env: &[(&'static str, String)],
    stdin: &str,
    timeout: Duration,
) -> Result<String, CommandError> {
    // One pipe for both streams, in the order written (Go's CombinedOutput).
    let script = format!("exec 2>&1\n{cmd}");
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(script)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| CommandError::Spawn(e.to_string()))?;
    let pgid = child.id();
    if let Some(mut input) = child.stdin.take() {
        let data = format!("{stdin}\n");
        // A command that does not read its input may exit first: not an error.
        let _ = input.write_all(data.as_bytes()).await;
    }
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) => {
            let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if out.status.success() {
                Ok(text)
            } else {
                Err(CommandError::Failed {
                    status: out.status.to_string(),
                    output: shorten(&text),
                })
            }
        }
        Ok(Err(e)) => Err(CommandError::Spawn(e.to_string())),
        Err(_) => {
            if let Some(pid) = pgid {
                // SAFETY: kill only sends a signal, to the group sh leads (we made it).
                unsafe {
                    libc::kill(-(pid as i32), libc::SIGKILL);
                }
            }
            Err(CommandError::Timeout(timeout))
        }
    }
}

/// The first `LOG_OUTPUT` bytes of `s` (on a character boundary), marked if cut.
pub fn shorten(s: &str) -> String {
    if s.len() <= LOG_OUTPUT {
        return s.to_string();
    }
    let mut end = LOG_OUTPUT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &s[..end], s.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn env_stdin_and_both_streams_arrive() {
        let out = run(
            r#"read LINE; echo "$SUBNET $LINE"; echo oops >&2"#,
            &[("SUBNET", "10.244.2.0/24".into())],
            "52:54:00:00:00:01",
            T,
        )
        .await
        .unwrap();
        assert_eq!(out, "10.244.2.0/24 52:54:00:00:00:01\noops");
    }

    #[tokio::test]
    async fn a_failure_carries_status_and_output() {
        let e = run("echo no route; exit 3", &[], "", T).await.unwrap_err();
        match e {
            CommandError::Failed { status, output } => {
                assert!(status.contains('3'), "{status}");
                assert_eq!(output, "no route");
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_hung_command_is_killed_with_its_children() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let cmd = format!("sleep 60 & echo $! > {}; wait", pidfile.display());
        let started = std::time::Instant::now();
        let e = run(&cmd, &[], "", Duration::from_millis(300))
            .await
            .unwrap_err();
        assert_eq!(e, CommandError::Timeout(Duration::from_millis(300)));
        assert!(started.elapsed() < Duration::from_secs(5));
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The grandchild went with the group (bounded wait for the kernel to reap it).
        let mut gone = false;
        for _ in 0..50 {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // Gone, or a zombie waiting for init.
            if stat.is_empty() || stat.split(' ').nth(2) == Some("Z") {
                gone = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(gone, "sleep {pid} survived the timeout");
    }

    #[test]
    fn long_output_is_shortened_on_a_char_boundary() {
        let s = "é".repeat(2000);
        let t = shorten(&s);
        assert!(t.len() < 1100 && t.ends_with("(4000 bytes)"), "{}", t.len());
        assert_eq!(shorten("short"), "short");
    }
}
