//! The `hauberk` binary: hands the arguments to the command line and exits with its status.

fn main() {
    std::process::exit(hauberk::cli::main(std::env::args_os()));
}
