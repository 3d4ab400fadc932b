//! The shell commands an execution and the file operations run inside a runner (all through
//! `/bin/bash -c`), built with proper single-quote escaping instead of Poseidon's `%q` (so
//! environment values with spaces or quotes pass intact).
//!
//! An execution runs as two exec sessions, as Poseidon's interactivestderr trick: the main one
//! with a terminal (stdout on a PTY, echo, `\r\n`) whose stderr goes to a FIFO, and a second one
//! *without* a terminal that creates the FIFO and `cat`s it, so stderr arrives apart and with
//! plain `\n`. Both carry an environment marker `EXECUTION_ID=<id>`, inherited by everything
//! the command starts; cancelling runs a third exec that SIGKILLs every process carrying the
//! marker (found through `/proc/*/environ`), so the whole tree dies even when it left the
//! process group or session, and even though Nomad (docker exec) keeps a process alive when its
//! socket closes.

use runner_core::ExecutionRequest;

/// Quotes `s` for bash as one word.
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The commands of one execution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecutionCommands {
    /// The main session's argv (runs with a terminal).
    pub main: Vec<String>,
    /// The stderr session's argv (no terminal).
    pub stderr: Vec<String>,
    /// The argv that kills the execution's processes and removes its FIFO.
    pub kill: Vec<String>,
}

fn bash(script: String) -> Vec<String> {
    vec!["/bin/bash".into(), "-c".into(), script]
}

/// Builds the commands running `request` as execution `id` (hex, no quotes needed).
pub fn execution(
    request: &ExecutionRequest,
    id: &str,
    unprivileged_prefix: &[String],
) -> ExecutionCommands {
    let fifo = format!("/tmp/.poseidon-stderr-{id}");
    let mut user = String::from("env CODEOCEAN=true");
    for (k, v) in &request.environment {
        user.push(' ');
        user.push_str(&quote(&format!("{k}={v}")));
    }
    user.push_str(" /bin/bash -c ");
    user.push_str(&quote(&request.command));
    let prefix = if request.privileged_execution {
        String::new()
    } else {
        unprivileged_prefix
            .iter()
            .map(|w| quote(w))
            .collect::<Vec<_>>()
            .join(" ")
            + " "
    };
    let main = format!(
        "unset ${{!NOMAD_@}}; export EXECUTION_ID={id}; \
         n=0; until [ -p {fifo} ]; do n=$((n+1)); [ $n -gt 3000 ] && exit 125; sleep 0.01; done; \
         exec 2>{fifo}; exec {prefix}{user}"
    );
    let stderr = format!(
        "unset ${{!NOMAD_@}}; export EXECUTION_ID={id}; \
         mkfifo -m 0600 {fifo} && cat {fifo}; rm -f {fifo}"
    );
    ExecutionCommands {
        main: bash(main),
        stderr: bash(stderr),
        kill: bash(kill_script(id, &fifo)),
    }
}

/// Kills every process whose environment holds `EXECUTION_ID=<id>` (three sweeps, to catch
/// processes forked during a sweep), then removes `fifo`.
fn kill_script(id: &str, fifo: &str) -> String {
    format!(
        "for sweep in 1 2 3; do for p in /proc/[0-9]*; do pid=${{p#/proc/}}; \
         [ \"$pid\" = \"$$\" ] && continue; \
         grep -qz '^EXECUTION_ID={id}$' \"$p/environ\" 2>/dev/null && kill -9 \"$pid\" 2>/dev/null; \
         done; done; rm -f {fifo}; true"
    )
}

/// Exit code of a file command whose path is missing or not accessible.
pub const NOT_FOUND_EXIT: i32 = 44;

/// `cd` into the working directory, then `script` (relative paths land in `workdir`).
fn in_workdir(workdir: &str, script: &str) -> String {
    format!("cd {} || exit 1; {script}", quote(workdir))
}

/// Deletes `paths` (`./*` is Poseidon's glob for "everything but dotfiles"), then extracts the
/// tar archive on stdin as root: directories 01777, files 0744, owned by root, dated now.
pub fn update(workdir: &str, delete: &[String]) -> Vec<String> {
    // Members are relative to `/` (see `files::member_name`).
    let mut script = String::from("umask 022; ");
    for d in delete {
        if d == "./*" {
            script.push_str("rm -rf -- ./*; ");
        } else {
            script.push_str(&format!("rm -rf -- {}; ", quote(d)));
        }
    }
    script.push_str(
        "tar --extract --directory=/ --touch --same-permissions --same-owner --numeric-owner \
         --file=/dev/stdin",
    );
    bash(in_workdir(workdir, &script))
}

/// Lists `path` (a directory's entries without dotfiles, recursively or not; or the file
/// itself) as NUL-separated fields: type, size, mtime, mode, user, group, link target, path
/// relative to the start.
pub fn list(workdir: &str, path: &str, recursive: bool, prefix: &[String]) -> Vec<String> {
    let depth = if recursive { "" } else { "-maxdepth 1 " };
    let follow = if path.ends_with('/') || path.is_empty() {
        "-H "
    } else {
        ""
    };
    // `find` has no `--`: a path that looks like an option is made explicit.
    let p = if path.is_empty() {
        quote(".")
    } else if path.starts_with('-') {
        quote(&format!("./{path}"))
    } else {
        quote(path)
    };
    let fmt = r"%y\0%s\0%T@\0%M\0%u\0%g\0%l\0%P\0";
    let script = format!(
        "{{ [ -e {p} ] || [ -L {p} ]; }} || exit {NOT_FOUND_EXIT}; \
         [ -r {p} ] || exit {NOT_FOUND_EXIT}; \
         find {follow}{p} -mindepth 1 {depth}-name '.*' -prune -o -printf '{fmt}' 2>/dev/null; \
         find {follow}{p} -maxdepth 0 -printf '{fmt}'"
    );
    with_prefix(workdir, &script, prefix)
}

/// Prints the size of the regular file `path` on one line, then its content.
pub fn read(workdir: &str, path: &str, prefix: &[String]) -> Vec<String> {
    let p = quote(path);
    let script = format!(
        "[ -f {p} ] && [ -r {p} ] || exit {NOT_FOUND_EXIT}; \
         exec 3<{p} || exit {NOT_FOUND_EXIT}; stat -L -c %s -- {p}; cat <&3"
    );
    with_prefix(workdir, &script, prefix)
}

fn with_prefix(workdir: &str, script: &str, prefix: &[String]) -> Vec<String> {
    let script = in_workdir(workdir, script);
    if prefix.is_empty() {
        return bash(script);
    }
    let mut argv: Vec<String> = prefix.to_vec();
    argv.extend(bash(script));
    argv
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn sh(argv: &[String]) -> std::process::Output {
        Command::new(&argv[0]).args(&argv[1..]).output().unwrap()
    }

    #[test]
    fn quoting_survives_bash() {
        for s in ["plain", "with space", "it's", "$HOME `x` \"q\" \\ ;&|"] {
            let out = sh(&bash(format!("printf %s {}", quote(s))));
            assert_eq!(String::from_utf8_lossy(&out.stdout), s);
        }
    }

    #[test]
    fn execution_commands_carry_the_marker_and_the_user_command_intact() {
        let mut r = ExecutionRequest::new("echo \"$A\" 'b'");
        r.environment.insert("A".into(), "x y'z".into());
        let c = execution(&r, "abc", &["/sbin/setuser".into(), "user".into()]);
        assert_eq!(&c.main[..2], ["/bin/bash", "-c"]);
        assert!(c.main[2].contains("export EXECUTION_ID=abc"));
        assert!(c.main[2].contains("exec 2>/tmp/.poseidon-stderr-abc"));
        assert!(c.main[2].contains("exec '/sbin/setuser' 'user' env CODEOCEAN=true 'A=x y'\\''z'"));
        assert!(c.stderr[2].contains("mkfifo -m 0600 /tmp/.poseidon-stderr-abc"));
        assert!(c.kill[2].contains("EXECUTION_ID=abc$"));
        r.privileged_execution = true;
        let c = execution(&r, "abc", &["/sbin/setuser".into(), "user".into()]);
        assert!(!c.main[2].contains("setuser"));
    }

    #[test]
    fn the_user_command_runs_with_its_environment() {
        // The part after the FIFO handshake, run directly.
        let mut r = ExecutionRequest::new("printf '%s|%s' \"$A\" \"$CODEOCEAN\"");
        r.environment.insert("A".into(), "x y'z".into());
        r.privileged_execution = true;
        let c = execution(&r, "t1", &[]);
        let user = c.main[2]
            .split("exec 2>/tmp/.poseidon-stderr-t1; exec ")
            .nth(1)
            .unwrap();
        let out = sh(&bash(user.to_string()));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "x y'z|true");
    }
}
