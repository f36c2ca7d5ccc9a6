//! x86_64: PVH boot, CPUID, MSRs, MP table.
