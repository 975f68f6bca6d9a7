//! `lossyfs BACKING MOUNTPOINT`: serves one lossy filesystem (see
//! `txmap_chaos_tests::lossyfs`), driven over stdin by the tests. Not for production use.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<std::path::PathBuf> = std::env::args_os().skip(1).map(Into::into).collect();
    let [backing, mountpoint] = args.as_slice() else {
        eprintln!("usage: lossyfs BACKING MOUNTPOINT (commands on stdin: freeze, cut SEED TEAR, dirty, quit)");
        return ExitCode::from(2);
    };
    match txmap_chaos_tests::lossyfs::serve(backing, mountpoint) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // the client waits for one line: say why
            println!("error: {e:#}");
            eprintln!("lossyfs: {e:#}");
            ExitCode::FAILURE
        }
    }
}
