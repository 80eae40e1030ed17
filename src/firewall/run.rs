//! Running the firewall tools: bounded in time, killed when the wait ends.

use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// Longest any one tool run may take (iptables waits up to 5 s for the xtables lock).
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `bin args`, feeding `input` on stdin; (succeeded, stdout + stderr).
pub async fn run_with(
    bin: &str,
    args: &[&str],
    input: Option<&str>,
) -> anyhow::Result<(bool, String)> {
    let mut child = Command::new(bin)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("running {bin}"))?;
    let work = async {
        if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin.write_all(text.as_bytes()).await?;
        }
        child.wait_with_output().await
    };
    let o = tokio::time::timeout(TOOL_TIMEOUT, work)
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "{bin} {} did not finish within {TOOL_TIMEOUT:?}; killed",
                args.join(" ")
            )
        })?
        .with_context(|| format!("running {bin}"))?;
    Ok((
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr),
    ))
}

pub async fn run_for(bin: &str, args: &[&str]) -> anyhow::Result<(bool, String)> {
    run_with(bin, args, None).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_hung_tool_is_killed_at_the_bound() {
        tokio::time::pause();
        // `sleep` would outlive the bound; paused time makes the bound pass at once.
        let r = run_for("sleep", &["60"]).await;
        assert!(r.unwrap_err().to_string().contains("did not finish"));
    }

    #[tokio::test]
    async fn stdin_reaches_the_tool() {
        let (ok, out) = run_with("cat", &[], Some("*nat\nCOMMIT\n")).await.unwrap();
        assert!(ok);
        assert_eq!(out, "*nat\nCOMMIT\n");
    }
}
