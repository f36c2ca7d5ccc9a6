# The ring-0 kernel of the test guest.
#
# On the PVM host every ring-0 instruction is emulated (~0.5 us each) and SSE, x87, popcnt,
# BMI, int3 and friends kill the VM, so ring 0 is this small file and nothing else: PVH
# entry, long mode, GDT/TSS/IDT, per-CPU stacks, the AP trampoline, interrupt stubs and
# a few services that ring 3 requests with `ud2` (the only ring-3 -> ring-0 entry that
# works on this host). Everything else runs as Rust in ring 3, natively.
#
# The build disassembles .r0text16/.r0text32/.r0text and fails on forbidden instructions.
# This file is a Rust format string (global_asm!): it must never contain braces.

.set KCODE64, 0x08
.set KDATA, 0x10
.set UDATA3, 0x1b
.set UCODE3, 0x23
.set KCODE32, 0x28
.set TSS0, 0x30
.set MAX_CPUS, 32
.set GDT_LIMIT, (6 + 2 * MAX_CPUS) * 8 - 1
.set KSTACK_SHIFT, 12
.set USTACK_SHIFT, 15
.set PERCPU_SHIFT, 6
.set TSS_SHIFT, 7
.set LAPIC_EOI, 0xfee000b0
.set LAPIC_BASE, 0xfee00000
# Service numbers (rax at the ud2). Unusual values so that a stray ud2 in ring-3 code
# (core's abort) is reported as a fault instead of being run as a service.
.set SVC_WRITE, 0x54470000
.set SVC_IDLE, 0x54470001
.set SVC_OUTB, 0x54470002
.set SVC_LAPIC_WR, 0x54470003
.set SVC_LAPIC_RD, 0x54470004
# Vectors that push an error code: 8, 10-14, 17, 21, 29, 30.
.set ERRCODE_MASK, 0x60227d00

# ---------------------------------------------------------------------------------------
# PVH entry note: the VMM enters pvh_start in 32-bit protected mode, paging off,
# ebx = physical address of hvm_start_info.
.pushsection .note.pvh, "a", @note
.balign 4
.long 4
.long 4
.long 18
.asciz "Xen"
.balign 4
.long pvh_start
.popsection

# Shared by the boot CPU and the APs: PAE + SSE enable bits, our page tables, EFER.LME,
# then paging. CR0: PG | NE | MP | PE, EM clear (ring 3 uses SSE).
.macro ENABLE_LONG_MODE
    movl $0x620, %eax
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl $0x80000023, %eax
    movl %eax, %cr0
.endm

.macro LOAD_KDATA
    movl $KDATA, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %eax, %fs
    movl %eax, %gs
.endm

# ---------------------------------------------------------------------------------------
.pushsection .ring0.text32, "ax"
.code32
.globl pvh_start
pvh_start:
    cli
    cld
    movl %ebx, start_info_ptr
    lgdtl gdt_ptr
    ljmpl $KCODE32, $1f
1:
    LOAD_KDATA
    ENABLE_LONG_MODE
    ljmpl $KCODE64, $bsp_entry64

# Reached from the trampoline with our GDT loaded and CR0.PE set.
.globl ap_entry32
ap_entry32:
    LOAD_KDATA
    ENABLE_LONG_MODE
    ljmpl $KCODE64, $ap_entry64
.popsection

# ---------------------------------------------------------------------------------------
# AP trampoline, copied by ring 3 to 0x10000 (SIPI vector 0x10). The AP starts here in
# real mode with CS = 0x1000. The GDT pseudo-descriptor is not part of this code: ring 3
# writes it at 0x10f00 so that this section holds nothing but instructions.
.pushsection .ring0.text16, "ax"
.code16
.globl tramp_start
tramp_start:
    cli
    movw %cs, %ax
    movw %ax, %ds
    lgdtl 0xf00
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $KCODE32, $ap_entry32
.globl tramp_end
tramp_end:
.popsection

# ---------------------------------------------------------------------------------------
.pushsection .ring0.text, "ax"
.code64

bsp_entry64:
    LOAD_KDATA
    # A late AP must never find a CPU index to claim (see ap_entry64).
    movq $-1, %rax
    movq %rax, ap_boot_cpu(%rip)
    leaq kstacks(%rip), %rsp
    addq $(1 << KSTACK_SHIFT), %rsp
    # Mask both legacy PICs: a BIOS (QEMU's SeaBIOS) may leave the PIT unmasked on
    # vector 8, which would look like a double fault. All our interrupts are LAPIC ones.
    movb $0xff, %al
    outb %al, $0x21
    outb %al, $0xa1
    call build_idt
    call probe
    xorl %ecx, %ecx
    call cpu_setup
    movl start_info_ptr(%rip), %edi
    xorl %ecx, %ecx
    leaq rust_main(%rip), %rdx
    jmp enter_user

ap_entry64:
    LOAD_KDATA
    # Claim the CPU index the boot CPU published. If it already gave up on us (timeout),
    # the slot holds -1: park forever rather than run as a duplicate CPU.
    movq $-1, %rcx
    xchgq %rcx, ap_boot_cpu(%rip)
    cmpq $-1, %rcx
    je park
    leaq kstacks(%rip), %rsp
    movq %rcx, %rax
    incq %rax
    shlq $KSTACK_SHIFT, %rax
    addq %rax, %rsp
    call cpu_setup
    movq %rcx, %rdi
    leaq rust_ap_main(%rip), %rdx
    jmp enter_user

park:
    cli
    hlt
    jmp park

# iretq to ring 3: rcx = CPU index (selects the user stack), rdx = entry, rdi = argument.
# The user RSP is 8 below a 16-byte boundary, as right after a call.
enter_user:
    movq %rcx, %rax
    incq %rax
    shlq $USTACK_SHIFT, %rax
    leaq ustacks(%rip), %rsi
    addq %rsi, %rax
    subq $8, %rax
    pushq $UDATA3
    pushq %rax
    pushq $0x202
    pushq $UCODE3
    pushq %rdx
    iretq

# Per-CPU ring-0 state for CPU rcx (preserved), running on its kernel stack: TSS with
# RSP0 = this stack's top, its GDT descriptor (built at run time because the base is
# split), ltr, lidt, and GS base -> percpu slot (index, tick counter).
cpu_setup:
    pushq %rcx
    movq %rcx, %rax
    shlq $TSS_SHIFT, %rax
    leaq tss_area(%rip), %rsi
    addq %rax, %rsi
    leaq kstacks(%rip), %rax
    movq %rcx, %rdx
    incq %rdx
    shlq $KSTACK_SHIFT, %rdx
    addq %rdx, %rax
    movq %rax, 4(%rsi)
    movw $104, 102(%rsi)
    # Descriptor low: limit 103 | base[23:0] << 16 | type 0x89 << 40 | base[31:24] << 56.
    movq %rsi, %rax
    andl $0xffffff, %eax
    shlq $16, %rax
    movq %rsi, %rdx
    shrq $24, %rdx
    andl $0xff, %edx
    shlq $56, %rdx
    orq %rdx, %rax
    movabsq $0x0000890000000067, %rdx
    orq %rdx, %rax
    leaq gdt(%rip), %rdx
    movq %rcx, %r8
    shlq $4, %r8
    addq %r8, %rdx
    movq %rax, TSS0(%rdx)
    movq %rsi, %rax
    shrq $32, %rax
    movq %rax, TSS0+8(%rdx)
    leaq TSS0(%r8), %rax
    ltr %ax
    lidt idt_ptr(%rip)
    leaq percpu(%rip), %rax
    shlq $PERCPU_SHIFT, %rcx
    addq %rcx, %rax
    popq %rcx
    movq %rcx, (%rax)
    movq $0, 8(%rax)
    movq %rax, %rdx
    shrq $32, %rdx
    pushq %rcx
    movl $0xc0000101, %ecx
    wrmsr
    popq %rcx
    ret

# Boot CPU only: what ring 3 cannot safely ask itself (cpuid may fault or trap in ring 3).
# Hypervisor leaf 0x40000010 gives TSC and LAPIC bus kHz when present; RDRAND gives the
# boot nonce and the default pattern seed.
probe:
    pushq %rbx
    movq $0, tsc_khz(%rip)
    movq $0, bus_khz(%rip)
    movq $0, rdrand_ok(%rip)
    movl $0x40000000, %eax
    xorl %ecx, %ecx
    cpuid
    movq %rax, hv_max_leaf(%rip)
    cmpl $0x40000010, %eax
    jb 1f
    cmpl $0x400000ff, %eax
    ja 1f
    movl $0x40000010, %eax
    xorl %ecx, %ecx
    cpuid
    movq %rax, tsc_khz(%rip)
    movq %rbx, bus_khz(%rip)
1:
    movl $1, %eax
    cpuid
    btl $30, %ecx
    jnc 4f
    movl $16, %ecx
2:
    rdrand %rax
    jc 3f
    decl %ecx
    jnz 2b
    jmp 4f
3:
    movq %rax, rand_nonce(%rip)
    rdrand %rax
    jnc 4f
    movq %rax, rand_seed(%rip)
    movq $1, rdrand_ok(%rip)
4:
    rdtsc
    shlq $32, %rdx
    orq %rdx, %rax
    movq %rax, boot_tsc(%rip)
    popq %rbx
    ret

# IDT: 32 exception stubs, #UD -> services, 0x20 -> timer, 0xff -> spurious, every other
# vector -> EOI and return. Built once at run time (gate offsets are split fields).
build_idt:
    leaq idt(%rip), %rdi
    xorl %ecx, %ecx
1:
    leaq irq_other(%rip), %rax
    cmpl $32, %ecx
    jae 2f
    leaq exc_stubs(%rip), %rax
    movl %ecx, %edx
    shll $4, %edx
    addq %rdx, %rax
2:
    cmpl $6, %ecx
    jne 3f
    leaq ud_entry(%rip), %rax
3:
    cmpl $0x20, %ecx
    jne 4f
    leaq timer_entry(%rip), %rax
4:
    cmpl $0xff, %ecx
    jne 5f
    leaq irq_spurious(%rip), %rax
5:
    # Gate: offset[15:0] | sel 0x08 << 16 | type 0x8e << 40 | offset[31:16] << 48; offset[63:32].
    movl %eax, %edx
    andl $0xffff, %edx
    movl %eax, %r8d
    andl $0xffff0000, %r8d
    shlq $32, %r8
    orq %r8, %rdx
    movabsq $0x00008e0000080000, %r8
    orq %r8, %rdx
    movq %rdx, (%rdi)
    shrq $32, %rax
    movq %rax, 8(%rdi)
    addq $16, %rdi
    incl %ecx
    cmpl $256, %ecx
    jb 1b
    lidt idt_ptr(%rip)
    ret

# LAPIC timer: count a tick on this CPU (percpu.ticks via GS), EOI.
timer_entry:
    incq %gs:8
    pushq %rax
    movl $LAPIC_EOI, %eax
    movl $0, (%rax)
    popq %rax
    iretq

irq_other:
    pushq %rax
    movl $LAPIC_EOI, %eax
    movl $0, (%rax)
    popq %rax
    iretq

irq_spurious:
    iretq

# #UD. From ring 3 with a service number in rax: run the service, skip the 2-byte ud2.
# Every register but rax is preserved. Anything else is a fault.
ud_entry:
    testb $3, 8(%rsp)
    jz ud_fault
    cmpl $SVC_WRITE, %eax
    je svc_write
    cmpl $SVC_IDLE, %eax
    je svc_idle
    cmpl $SVC_OUTB, %eax
    je svc_outb
    cmpl $SVC_LAPIC_WR, %eax
    je svc_lapic_wr
    cmpl $SVC_LAPIC_RD, %eax
    je svc_lapic_rd
ud_fault:
    pushq $6
    jmp exc_common
svc_ret:
    addq $2, (%rsp)
    iretq

# rdi = buffer, rsi = length. One port exit per byte; no LSR poll (the VMM's 16550 THR
# is always empty). Ring 3 holds the serial lock around the call, so lines stay whole.
svc_write:
    pushq %rsi
    pushq %rdi
    pushq %rdx
    movl $0x3f8, %edx
    testq %rsi, %rsi
    jz 2f
1:
    movb (%rdi), %al
    outb %al, %dx
    incq %rdi
    decq %rsi
    jnz 1b
2:
    popq %rdx
    popq %rdi
    popq %rsi
    xorl %eax, %eax
    jmp svc_ret

# Sleep until the next interrupt. sti's one-instruction shadow makes sti;hlt atomic.
svc_idle:
    sti
    hlt
    cli
    xorl %eax, %eax
    jmp svc_ret

# rdi = port, rsi = byte.
svc_outb:
    pushq %rdx
    movl %edi, %edx
    movl %esi, %eax
    outb %al, %dx
    popq %rdx
    xorl %eax, %eax
    jmp svc_ret

# rdi = xAPIC register offset, rsi = value.
svc_lapic_wr:
    movl %edi, %eax
    andl $0xff0, %eax
    orl $LAPIC_BASE, %eax
    movl %esi, (%rax)
    xorl %eax, %eax
    jmp svc_ret

# rdi = xAPIC register offset; returns the value in rax.
svc_lapic_rd:
    movl %edi, %eax
    andl $0xff0, %eax
    orl $LAPIC_BASE, %eax
    movl (%rax), %eax
    jmp svc_ret

# Exception stubs, 16 bytes apart: push the vector, share one reporting path.
.balign 16
exc_stubs:
.set vec, 0
.rept 32
    .balign 16
    pushq $vec
    jmp exc_common
    .set vec, vec + 1
.endr

# Fatal: print "TG fault vec=<v> err=<e> rip=<r> cr2=<a>" and park this CPU. Stack:
# vector, [error code], rip, ...
exc_common:
    cli
    movq (%rsp), %rbx
    xorl %r12d, %r12d
    leaq 8(%rsp), %r13
    btl %ebx, err_mask(%rip)
    jnc 1f
    movq 8(%rsp), %r12
    leaq 16(%rsp), %r13
1:
    leaq msg_vec(%rip), %rsi
    call puts
    movq %rbx, %rax
    call puthex
    leaq msg_err(%rip), %rsi
    call puts
    movq %r12, %rax
    call puthex
    leaq msg_rip(%rip), %rsi
    call puts
    movq (%r13), %rax
    call puthex
    leaq msg_cr2(%rip), %rsi
    call puts
    movq %cr2, %rax
    call puthex
    movl $0x3f8, %edx
    movb $10, %al
    outb %al, %dx
    jmp park

# NUL-terminated string at rsi to COM1.
puts:
    movl $0x3f8, %edx
1:
    movb (%rsi), %al
    testb %al, %al
    jz 2f
    outb %al, %dx
    incq %rsi
    jmp 1b
2:
    ret

# rax as 16 hex digits to COM1.
puthex:
    movq %rax, %r8
    movl $16, %ecx
    movl $0x3f8, %edx
1:
    rolq $4, %r8
    movl %r8d, %eax
    andl $15, %eax
    cmpl $10, %eax
    jb 2f
    addl $39, %eax
2:
    addl $48, %eax
    outb %al, %dx
    decl %ecx
    jnz 1b
    ret
.popsection

# ---------------------------------------------------------------------------------------
.pushsection .ring0.data, "aw"
.balign 16
.globl gdt
gdt:
    .quad 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
    .quad 0x00cff2000000ffff
    .quad 0x00affa000000ffff
    .quad 0x00cf9a000000ffff
    .fill 2 * MAX_CPUS, 8, 0
.globl gdt_ptr
gdt_ptr:
    .word GDT_LIMIT
    .quad gdt
idt_ptr:
    .word 4095
    .quad idt
err_mask:
    .long ERRCODE_MASK
msg_vec:
    .asciz "TG fault vec="
msg_err:
    .asciz " err="
msg_rip:
    .asciz " rip="
msg_cr2:
    .asciz " cr2="

# Identity map of the low 4 GiB with 2 MiB pages, U=1 everywhere (ring 3 runs all the
# Rust code and touches everything). Static, so boot costs no emulated loop; the 4th GiB
# (MMIO: LAPIC, IOAPIC) is uncached. Ring 3 adds PDPT entries 4.. for RAM above 4 GiB.
.balign 4096
.globl pml4
pml4:
    .quad pdpt + 7
    .fill 511, 8, 0
.globl pdpt
pdpt:
    .quad pd_low + 7
    .quad pd_low + 4096 + 7
    .quad pd_low + 8192 + 7
    .quad pd_low + 12288 + 7
    .fill 508, 8, 0
pd_low:
.set pg, 0
.rept 1536
    .quad (pg << 21) | 0x87
    .set pg, pg + 1
.endr
.rept 512
    .quad (pg << 21) | 0x9f
    .set pg, pg + 1
.endr
.popsection

# ---------------------------------------------------------------------------------------
.pushsection .ring0.bss, "aw", @nobits
.balign 4096
idt:
    .skip 4096
.balign 128
tss_area:
    .skip (1 << TSS_SHIFT) * MAX_CPUS
.balign 64
.globl percpu
percpu:
    .skip (1 << PERCPU_SHIFT) * MAX_CPUS
.balign 8
.globl start_info_ptr
start_info_ptr:
    .skip 8
.globl ap_boot_cpu
ap_boot_cpu:
    .skip 8
.globl tsc_khz
tsc_khz:
    .skip 8
.globl bus_khz
bus_khz:
    .skip 8
.globl hv_max_leaf
hv_max_leaf:
    .skip 8
.globl rdrand_ok
rdrand_ok:
    .skip 8
.globl rand_nonce
rand_nonce:
    .skip 8
.globl rand_seed
rand_seed:
    .skip 8
.globl boot_tsc
boot_tsc:
    .skip 8
.popsection

.pushsection .ring0.stacks, "aw", @nobits
.balign 4096
kstacks:
    .skip (1 << KSTACK_SHIFT) * MAX_CPUS
.globl ustacks
ustacks:
    .skip (1 << USTACK_SHIFT) * MAX_CPUS
.popsection

.code64
