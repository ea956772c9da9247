//! Every `.nix` file of the repository parses, is formatted as nixpkgs formats it, and has no
//! dead code: the checks that stand in for a Nix build on machines that cannot run one.

use std::ffi::OsString;
use std::path::PathBuf;

use flake_tests::{describe, files_ending_with, repo_root, run};

fn nix_files() -> Vec<PathBuf> {
    let files = files_ending_with(".", &[".nix"]);
    assert!(
        files.iter().any(|f| f.ends_with("flake.nix")),
        "no flake.nix found under {}",
        repo_root().display()
    );
    files
}

#[test]
fn every_nix_file_parses() {
    for file in nix_files() {
        let output = run("nix-instantiate", ["--parse".as_ref(), file.as_os_str()]);
        assert!(
            output.status.success(),
            "{} does not parse: {}",
            file.display(),
            describe(&output)
        );
    }
}

#[test]
fn every_nix_file_is_formatted() {
    let mut args = vec![OsString::from("--check")];
    args.extend(nix_files().into_iter().map(OsString::from));
    let output = run("nixpkgs-fmt", args);
    assert!(
        output.status.success(),
        "run `nixpkgs-fmt` on these files: {}",
        describe(&output)
    );
}

#[test]
fn no_nix_file_has_dead_code() {
    let mut args = vec![OsString::from("--fail")];
    args.extend(nix_files().into_iter().map(OsString::from));
    let output = run("deadnix", args);
    assert!(
        output.status.success(),
        "deadnix found unused code: {}",
        describe(&output)
    );
}

#[test]
fn flake_nix_holds_only_inputs_and_wiring() {
    let flake = flake_tests::read("flake.nix");
    assert!(
        flake.contains("import ./nix"),
        "flake.nix hands everything to nix/"
    );
    for builder in [
        "buildLayeredImage",
        "buildPackage",
        "runNixOSTest",
        "mkShell",
        "cargoClippy",
    ] {
        assert!(
            !flake.contains(builder),
            "flake.nix builds something itself ({builder}); move it to nix/"
        );
    }
}
