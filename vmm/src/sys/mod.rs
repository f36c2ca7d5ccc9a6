//! Thin safe wrappers over the few syscalls the std types do not cover, so that the
//! modules above (`net`, `api`, `migration`, `sparse`) hold no `unsafe` of their own for
//! them. The memory mappings, KVM, userfaultfd and seccomp keep theirs where they are.

pub mod memory;
pub mod socket;
