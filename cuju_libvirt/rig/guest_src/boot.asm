; cuju-libvirt boot-sector test guest (nasm -f bin; 512 bytes; boots from a raw disk).
;
; Sets up COM1 (115200 8N1), enters flat 32-bit protected mode with interrupts off, then
; loops forever: increment the counter at COUNTER_GPA, (writer mode) write to pages of a
; RAM span, print the counter in decimal on COM1 ("123\r\n"), busy-wait DELAY iterations.
;
; Guest-physical memory it writes (keep in sync with cuju_libvirt/rig/guests.py):
;   0x6000-0x6fff  stack (grows down from STACK_TOP)
;   0x8000         u32 counter          (COUNTER_GPA)
;   0x8004         u32 magic 'CUJU'     (MAGIC_GPA), written once before the loop
;   0x8008         u32 xorshift32 state (writer mode)
;   0x800c         u32 command (POWER builds only; zeroed at boot, read every iteration, written
;                  from outside through the RAM file): 1 = power off (ACPI S5 through the
;                  PIIX4 PM1a control register at 0x604), 2 = reset (keyboard controller),
;                  3 = suspend to RAM (ACPI S3, same register; a wake-up without a resume
;                  vector makes the firmware reset the machine: the guest boots again)
;   SPAN_BASE..    writer mode only: SPAN_PAGES pages; each iteration writes the counter
;                  into WRITES pseudo-random pages, and every RUN_EVERY-th iteration into
;                  RUN_PAGES consecutive pages from a random start (wrapping in the span).
; Nothing else is written after the jump to protected mode (the GDT descriptors have
; their accessed bits preset so the CPU does not write them).
;
; Build-time defines (nasm -D): DELAY, POWER, WRITER, SPAN_BASE, SPAN_PAGES, WRITES, RUN_EVERY
; (a power of two), RUN_PAGES, SEED.

%ifndef DELAY
%define DELAY 100000
%endif
%ifndef SPAN_BASE
%define SPAN_BASE 0x100000
%endif
%ifndef SPAN_PAGES
%define SPAN_PAGES 16384
%endif
%ifndef WRITES
%define WRITES 16
%endif
%ifndef RUN_EVERY
%define RUN_EVERY 16
%endif
%ifndef RUN_PAGES
%define RUN_PAGES 64
%endif
%ifndef SEED
%define SEED 0x2545f491
%endif

COM1        equ 0x3f8
STACK_TOP   equ 0x7000
COUNTER_GPA equ 0x8000
MAGIC_GPA   equ 0x8004
RNG_GPA     equ 0x8008
COMMAND_GPA equ 0x800c
MAGIC       equ 0x554a5543          ; "CUJU" little-endian

        bits 16
        org 0x7c00

start:
        cli
        cld
        xor ax, ax
        mov ds, ax
        mov es, ax
        mov ss, ax
        mov sp, STACK_TOP
        jmp 0:.cs0                     ; normalise CS:IP
.cs0:
        mov dx, COM1 + 1
        xor al, al
        out dx, al                     ; IER: no interrupts
        mov dl, 0xfb                   ; COM1 + 3 (LCR)
        mov al, 0x80
        out dx, al                     ; DLAB on
        mov dl, 0xf8
        mov al, 1
        out dx, al                     ; divisor 1: 115200 baud
        inc dx
        xor al, al
        out dx, al
        mov dl, 0xfb
        mov al, 3
        out dx, al                     ; 8N1, DLAB off
        dec dx                         ; COM1 + 2 (FCR)
        mov al, 0xc7
        out dx, al                     ; FIFOs on and cleared
        mov dl, 0xfc                   ; COM1 + 4 (MCR)
        mov al, 0x0b
        out dx, al
        in al, 0x92                    ; fast A20
        or al, 2
        and al, 0xfe
        out 0x92, al
        lgdt [gdt_desc]
        mov eax, cr0
        or al, 1
        mov cr0, eax
        jmp dword 0x08:pmode

        bits 32
pmode:
        mov ax, 0x10
        mov ds, ax
        mov es, ax
        mov ss, ax
        mov fs, ax
        mov gs, ax
        mov esp, STACK_TOP
        mov dword [COUNTER_GPA], 0
        mov dword [RNG_GPA], SEED
        mov dword [MAGIC_GPA], MAGIC
%ifdef POWER
        mov dword [COMMAND_GPA], 0
%endif
        mov esi, banner
.puts:
        lodsb
        test al, al
        jz main_loop
        call putc
        jmp .puts

main_loop:
        mov eax, [COUNTER_GPA]
        inc eax
        mov [COUNTER_GPA], eax
%ifdef WRITER
        call scribble
        mov eax, [COUNTER_GPA]
%endif
        ; print eax in decimal
        mov ebx, 10
        xor ecx, ecx
.div:
        xor edx, edx
        div ebx
        push edx
        inc ecx
        test eax, eax
        jnz .div
.digit:
        pop eax
        add al, '0'
        call putc
        loop .digit
        mov al, 13
        call putc
        mov al, 10
        call putc
        mov ecx, DELAY
.wait:
        dec ecx
        jnz .wait
%ifdef POWER
        mov eax, [COMMAND_GPA]
        cmp eax, 1
        jne .no_off
        mov dx, 0x604
        mov ax, 0x2000                 ; SLP_EN, SLP_TYP 0: S5
        out dx, ax
.no_off:
        cmp eax, 2
        jne .no_reset
        mov al, 0xfe                   ; pulse the CPU reset line
        out 0x64, al
.no_reset:
        cmp eax, 3
        jne .no_suspend
        mov dx, 0x604
        mov ax, 0x2400                 ; SLP_EN, SLP_TYP 1: S3
        out dx, ax
.no_suspend:
%endif
        jmp main_loop

; putc: write al to COM1 once the transmitter holding register is empty. Clobbers ah, dx.
putc:
        mov ah, al
        mov dx, COM1 + 5
.busy:
        in al, dx
        test al, 0x20
        jz .busy
        mov dx, COM1
        mov al, ah
        out dx, al
        ret

%ifdef WRITER
; scribble: the writer's page writes for this iteration (values: the counter, which never repeats).
scribble:
        mov ecx, WRITES
.random:
        call rand_page                 ; edx = page index, eax = offset in page
        shl edx, 12
        lea edi, [edx + eax + SPAN_BASE]
        mov eax, [COUNTER_GPA]
        mov [edi], eax
        loop .random
        test dword [COUNTER_GPA], RUN_EVERY - 1
        jnz .done
        call rand_page
        mov ecx, RUN_PAGES
        mov eax, [COUNTER_GPA]
.run:
        mov edi, edx
        shl edi, 12
        mov [edi + SPAN_BASE], eax
        inc edx
        cmp edx, SPAN_PAGES
        jb .next
        xor edx, edx
.next:
        loop .run
.done:
        ret

; rand_page: step xorshift32; edx = state mod SPAN_PAGES, eax = a dword offset in the page.
rand_page:
        mov eax, [RNG_GPA]
        mov edx, eax
        shl edx, 13
        xor eax, edx
        mov edx, eax
        shr edx, 17
        xor eax, edx
        mov edx, eax
        shl edx, 5
        xor eax, edx
        mov [RNG_GPA], eax
        push ebx
        xor edx, edx
        mov ebx, SPAN_PAGES
        div ebx
        pop ebx
        and eax, 0xffc
        ret
%endif

banner:
%ifdef WRITER
        db "cuju-boot writer", 13, 10, 0
%else
        db "cuju-boot counter", 13, 10, 0
%endif

        align 8
gdt:
        dq 0
        dq 0x00cf9b000000ffff          ; 0x08: code, flat 4 GiB, accessed bit preset
        dq 0x00cf93000000ffff          ; 0x10: data, flat 4 GiB, accessed bit preset
gdt_desc:
        dw gdt_desc - gdt - 1
        dd gdt

        times 510 - ($ - $$) db 0
        dw 0xaa55
