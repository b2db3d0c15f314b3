import Foundation
import Testing
import TraceryTestSupport

@testable import TraceryX86

/// One case per instruction form: exact bytes, and what objdump (Intel syntax) calls them.
struct Form: Sendable, CustomTestStringConvertible {
  let name: String
  let expected: [UInt8]
  let disassembly: String
  let write: @Sendable (inout X86Writer) throws -> Void
  var testDescription: String { name }
}

let base: UInt64 = 0x10_0000

let forms: [Form] = [
  Form(name: "push rbp", expected: [0x55], disassembly: "push rbp") { $0.putPush(.rbp) },
  Form(name: "push r12", expected: [0x41, 0x54], disassembly: "push r12") { $0.putPush(.r12) },
  Form(name: "pop rdi", expected: [0x5f], disassembly: "pop rdi") { $0.putPop(.rdi) },
  Form(name: "pop r15", expected: [0x41, 0x5f], disassembly: "pop r15") { $0.putPop(.r15) },
  Form(name: "push imm32", expected: [0x68, 0x78, 0x56, 0x34, 0x12], disassembly: "push 0x12345678") {
    $0.putPush(immediate: 0x1234_5678)
  },
  Form(name: "pushfq", expected: [0x9c], disassembly: "pushf") { $0.putPushfq() },
  Form(name: "popfq", expected: [0x9d], disassembly: "popf") { $0.putPopfq() },
  Form(name: "mov rbp, rsp", expected: [0x48, 0x89, 0xe5], disassembly: "mov rbp,rsp") { $0.putMov(.rbp, .rsp) },
  Form(name: "mov r8, rdi", expected: [0x49, 0x89, 0xf8], disassembly: "mov r8,rdi") { $0.putMov(.r8, .rdi) },
  Form(name: "mov rax, r15", expected: [0x4c, 0x89, 0xf8], disassembly: "mov rax,r15") { $0.putMov(.rax, .r15) },
  Form(name: "mov eax, imm32", expected: [0xb8, 0x2a, 0, 0, 0], disassembly: "mov eax,0x2a") {
    $0.putMov(.rax, immediate: 42)
  },
  Form(name: "mov r9d, imm32", expected: [0x41, 0xb9, 0xff, 0xff, 0xff, 0xff], disassembly: "mov r9d,0xffffffff") {
    $0.putMov(.r9, immediate: 0xffff_ffff)
  },
  Form(
    name: "mov rcx, simm32", expected: [0x48, 0xc7, 0xc1, 0xfe, 0xff, 0xff, 0xff],
    disassembly: "mov rcx,0xfffffffffffffffe"
  ) { $0.putMov(.rcx, immediate: UInt64(bitPattern: -2)) },
  Form(
    name: "movabs r11, imm64", expected: [0x49, 0xbb, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11],
    disassembly: "movabs r11,0x1122334455667788"
  ) { $0.putMov(.r11, immediate: 0x1122_3344_5566_7788) },
  Form(
    name: "movabs rax, small", expected: [0x48, 0xb8, 1, 0, 0, 0, 0, 0, 0, 0], disassembly: "movabs rax,0x1"
  ) { $0.putMovabs(.rax, immediate: 1) },
  Form(name: "mov rax, [rsp]", expected: [0x48, 0x8b, 0x04, 0x24], disassembly: "mov rax,QWORD PTR [rsp]") {
    $0.putMov(.rax, Memory(.rsp))
  },
  Form(name: "mov rdi, [rbp]", expected: [0x48, 0x8b, 0x7d, 0x00], disassembly: "mov rdi,QWORD PTR [rbp+0x0]") {
    $0.putMov(.rdi, Memory(.rbp))
  },
  Form(name: "mov r13, [r13]", expected: [0x4d, 0x8b, 0x6d, 0x00], disassembly: "mov r13,QWORD PTR [r13+0x0]") {
    $0.putMov(.r13, Memory(.r13))
  },
  Form(name: "movsxd r10, [r10+7]", expected: [0x4d, 0x63, 0x52, 0x07], disassembly: "movsxd r10,DWORD PTR [r10+0x7]") {
    $0.putMovsxd(.r10, Memory(.r10, 7))
  },
  Form(name: "mov rsi, [r12+8]", expected: [0x49, 0x8b, 0x74, 0x24, 0x08], disassembly: "mov rsi,QWORD PTR [r12+0x8]") {
    $0.putMov(.rsi, Memory(.r12, 8))
  },
  Form(name: "mov rdx, [rbx-8]", expected: [0x48, 0x8b, 0x53, 0xf8], disassembly: "mov rdx,QWORD PTR [rbx-0x8]") {
    $0.putMov(.rdx, Memory(.rbx, -8))
  },
  Form(
    name: "mov [rsp+0x100], r9", expected: [0x4c, 0x89, 0x8c, 0x24, 0x00, 0x01, 0x00, 0x00],
    disassembly: "mov QWORD PTR [rsp+0x100],r9"
  ) { $0.putMov(Memory(.rsp, 0x100), .r9) },
  Form(
    name: "mov [rbp-0x30], rdi", expected: [0x48, 0x89, 0x7d, 0xd0], disassembly: "mov QWORD PTR [rbp-0x30],rdi"
  ) { $0.putMov(Memory(.rbp, -0x30), .rdi) },
  Form(
    name: "mov qword [rax], imm32", expected: [0x48, 0xc7, 0x00, 0x07, 0, 0, 0], disassembly: "mov QWORD PTR [rax],0x7"
  ) { $0.putMov(Memory(.rax), immediate: 7) },
  Form(
    name: "mov rax, [rip+x]", expected: [0x48, 0x8b, 0x05, 0xf9, 0x0f, 0x00, 0x00],
    disassembly: "mov rax,QWORD PTR [rip+0xff9]"
  ) { $0.putMov(.rax, .rip(base + 0x1000)) },
  Form(
    name: "mov qword [rip+x], imm32", expected: [0x48, 0xc7, 0x05, 0xf5, 0x0f, 0, 0, 0x01, 0, 0, 0],
    disassembly: "mov QWORD PTR [rip+0xff5],0x1"
  ) { $0.putMov(.rip(base + 0x1000), immediate: 1) },
  Form(name: "lea rdi, [rsp+16]", expected: [0x48, 0x8d, 0x7c, 0x24, 0x10], disassembly: "lea rdi,[rsp+0x10]") {
    $0.putLea(.rdi, Memory(.rsp, 16))
  },
  Form(name: "lea r10, [r14-1]", expected: [0x4d, 0x8d, 0x56, 0xff], disassembly: "lea r10,[r14-0x1]") {
    $0.putLea(.r10, Memory(.r14, -1))
  },
  Form(name: "sub rsp, 8", expected: [0x48, 0x83, 0xec, 0x08], disassembly: "sub rsp,0x8") {
    $0.putSub(.rsp, immediate: 8)
  },
  Form(name: "sub rsp, 0x200", expected: [0x48, 0x81, 0xec, 0x00, 0x02, 0, 0], disassembly: "sub rsp,0x200") {
    $0.putSub(.rsp, immediate: 0x200)
  },
  Form(name: "add rsp, 0x58", expected: [0x48, 0x83, 0xc4, 0x58], disassembly: "add rsp,0x58") {
    $0.putAdd(.rsp, immediate: 0x58)
  },
  Form(name: "add r11, 0x1000", expected: [0x49, 0x81, 0xc3, 0x00, 0x10, 0, 0], disassembly: "add r11,0x1000") {
    $0.putAdd(.r11, immediate: 0x1000)
  },
  Form(name: "and rsp, -16", expected: [0x48, 0x83, 0xe4, 0xf0], disassembly: "and rsp,0xfffffffffffffff0") {
    $0.putAnd(.rsp, immediate: -16)
  },
  Form(name: "cmp rax, 1", expected: [0x48, 0x83, 0xf8, 0x01], disassembly: "cmp rax,0x1") {
    $0.putCmp(.rax, immediate: 1)
  },
  Form(
    name: "cmp [r11-0x60], 7", expected: [0x49, 0x83, 0x7b, 0xa0, 0x07], disassembly: "cmp QWORD PTR [r11-0x60],0x7"
  ) { $0.putCmp(Memory(.r11, -0x60), immediate: 7) },
  Form(
    name: "or [r11+0x20], 0x100", expected: [0x49, 0x81, 0x4b, 0x20, 0x00, 0x01, 0, 0],
    disassembly: "or QWORD PTR [r11+0x20],0x100"
  ) { $0.putOr(Memory(.r11, 0x20), immediate: 0x100) },
  Form(name: "or rax, 0x4000", expected: [0x48, 0x81, 0xc8, 0x00, 0x40, 0, 0], disassembly: "or rax,0x4000") {
    $0.putOr(.rax, immediate: 0x4000)
  },
  Form(
    name: "cmp r10, fs:[0x18]", expected: [0x64, 0x4c, 0x3b, 0x14, 0x25, 0x18, 0, 0, 0],
    disassembly: "cmp r10,QWORD PTR fs:0x18"
  ) { $0.putCmp(.r10, .fs(0x18)) },
  Form(name: "or rdx, [r11+0x10]", expected: [0x49, 0x0b, 0x53, 0x10], disassembly: "or rdx,QWORD PTR [r11+0x10]") {
    $0.putOr(.rdx, Memory(.r11, 0x10))
  },
  Form(
    name: "test [r11+0x20], 4", expected: [0x49, 0xf7, 0x43, 0x20, 0x04, 0, 0, 0],
    disassembly: "test QWORD PTR [r11+0x20],0x4"
  ) { $0.putTest(Memory(.r11, 0x20), immediate: 4) },
  Form(name: "add rax, rdx", expected: [0x48, 0x01, 0xd0], disassembly: "add rax,rdx") { $0.putAdd(.rax, .rdx) },
  Form(name: "sub r8, r9", expected: [0x4d, 0x29, 0xc8], disassembly: "sub r8,r9") { $0.putSub(.r8, .r9) },
  Form(name: "xor eax, eax", expected: [0x31, 0xc0], disassembly: "xor eax,eax") { $0.putXor32(.rax, .rax) },
  Form(name: "xor r10d, r10d", expected: [0x45, 0x31, 0xd2], disassembly: "xor r10d,r10d") {
    $0.putXor32(.r10, .r10)
  },
  Form(name: "test rax, rax", expected: [0x48, 0x85, 0xc0], disassembly: "test rax,rax") { $0.putTest(.rax, .rax) },
  Form(name: "test rsp, 8", expected: [0x48, 0xf7, 0xc4, 0x08, 0, 0, 0], disassembly: "test rsp,0x8") {
    $0.putTest(.rsp, immediate: 8)
  },
  Form(name: "test r9, 8", expected: [0x49, 0xf7, 0xc1, 0x08, 0, 0, 0], disassembly: "test r9,0x8") {
    $0.putTest(.r9, immediate: 8)
  },
  Form(name: "lock inc [r11]", expected: [0xf0, 0x49, 0xff, 0x03], disassembly: "lock inc QWORD PTR [r11]") {
    $0.putInc(Memory(.r11), locked: true)
  },
  Form(name: "inc [rax+8]", expected: [0x48, 0xff, 0x40, 0x08], disassembly: "inc QWORD PTR [rax+0x8]") {
    $0.putInc(Memory(.rax, 8))
  },
  Form(
    name: "lock add [rdi], 2", expected: [0xf0, 0x48, 0x83, 0x07, 0x02], disassembly: "lock add QWORD PTR [rdi],0x2"
  ) {
    $0.putAdd(Memory(.rdi), immediate: 2, locked: true)
  },
  Form(
    name: "movaps [rsp+0x20], xmm1", expected: [0x0f, 0x29, 0x4c, 0x24, 0x20],
    disassembly: "movaps XMMWORD PTR [rsp+0x20],xmm1"
  ) { $0.putMovaps(Memory(.rsp, 0x20), XMMRegister(1)) },
  Form(
    name: "movaps xmm9, [rbp-0x40]", expected: [0x44, 0x0f, 0x28, 0x4d, 0xc0],
    disassembly: "movaps xmm9,XMMWORD PTR [rbp-0x40]"
  ) { $0.putMovaps(XMMRegister(9), Memory(.rbp, -0x40)) },
  Form(name: "xsave64 [rsp]", expected: [0x48, 0x0f, 0xae, 0x24, 0x24], disassembly: "xsave64 [rsp]") {
    $0.putXsave64(Memory(.rsp))
  },
  Form(name: "xrstor64 [r8+0x40]", expected: [0x49, 0x0f, 0xae, 0x68, 0x40], disassembly: "xrstor64 [r8+0x40]") {
    $0.putXrstor64(Memory(.r8, 0x40))
  },
  Form(
    name: "movdqu [rsp], xmm7", expected: [0xf3, 0x0f, 0x7f, 0x3c, 0x24], disassembly: "movdqu XMMWORD PTR [rsp],xmm7"
  ) { $0.putMovdqu(Memory(.rsp), XMMRegister(7)) },
  Form(
    name: "movdqu xmm0, [r8+0x10]", expected: [0xf3, 0x41, 0x0f, 0x6f, 0x40, 0x10],
    disassembly: "movdqu xmm0,XMMWORD PTR [r8+0x10]"
  ) { $0.putMovdqu(XMMRegister(0), Memory(.r8, 0x10)) },
  Form(name: "movq [rsp], xmm0", expected: [0x66, 0x0f, 0xd6, 0x04, 0x24], disassembly: "movq QWORD PTR [rsp],xmm0") {
    $0.putMovq(Memory(.rsp), XMMRegister(0))
  },
  Form(
    name: "movq xmm1, [rsp+8]", expected: [0xf3, 0x0f, 0x7e, 0x4c, 0x24, 0x08],
    disassembly: "movq xmm1,QWORD PTR [rsp+0x8]"
  ) {
    $0.putMovq(XMMRegister(1), Memory(.rsp, 8))
  },
  Form(
    name: "cmp byte fs:[x], 0", expected: [0x64, 0x80, 0x3c, 0x25, 0xf8, 0xff, 0xff, 0xff, 0x00],
    disassembly: "cmp BYTE PTR fs:0xfffffffffffffff8,0x0"
  ) { $0.putCmpByte(.fs(-8), immediate: 0) },
  Form(
    name: "mov byte fs:[x], 1", expected: [0x64, 0xc6, 0x04, 0x25, 0x10, 0x00, 0x00, 0x00, 0x01],
    disassembly: "mov BYTE PTR fs:0x10,0x1"
  ) { $0.putMovByte(.fs(0x10), immediate: 1) },
  Form(
    name: "mov r11, fs:[0]", expected: [0x64, 0x4c, 0x8b, 0x1c, 0x25, 0, 0, 0, 0],
    disassembly: "mov r11,QWORD PTR fs:0x0"
  ) { $0.putMov(.r11, .fs(0)) },
  Form(name: "mov byte [rax], 0", expected: [0xc6, 0x00, 0x00], disassembly: "mov BYTE PTR [rax],0x0") {
    $0.putMovByte(Memory(.rax), immediate: 0)
  },
  Form(name: "test eax, eax", expected: [0x85, 0xc0], disassembly: "test eax,eax") { $0.putTest32(.rax, .rax) },
  Form(name: "rdtsc", expected: [0x0f, 0x31], disassembly: "rdtsc") { $0.putRdtsc() },
  Form(name: "shl rdx, 32", expected: [0x48, 0xc1, 0xe2, 0x20], disassembly: "shl rdx,0x20") {
    $0.putShl(.rdx, immediate: 32)
  },
  Form(name: "shr r10, 16", expected: [0x49, 0xc1, 0xea, 0x10], disassembly: "shr r10,0x10") {
    $0.putShr(.r10, immediate: 16)
  },
  Form(name: "shr rax, cl", expected: [0x48, 0xd3, 0xe8], disassembly: "shr rax,cl") { $0.putShrCL(.rax) },
  Form(name: "imul rax, r10", expected: [0x49, 0x0f, 0xaf, 0xc2], disassembly: "imul rax,r10") {
    $0.putImul(.rax, .r10)
  },
  Form(name: "and rax, [r11+8]", expected: [0x49, 0x23, 0x43, 0x08], disassembly: "and rax,QWORD PTR [r11+0x8]") {
    $0.putAnd(.rax, Memory(.r11, 8))
  },
  Form(name: "cmp rdi, r10", expected: [0x4c, 0x39, 0xd7], disassembly: "cmp rdi,r10") { $0.putCmp(.rdi, .r10) },
  Form(name: "add r10, [r11+16]", expected: [0x4d, 0x03, 0x53, 0x10], disassembly: "add r10,QWORD PTR [r11+0x10]") {
    $0.putAdd(.r10, Memory(.r11, 16))
  },
  Form(name: "ret 8", expected: [0xc2, 0x08, 0x00], disassembly: "ret 0x8") { $0.putRet(popping: 8) },
  Form(name: "or rax, rdx", expected: [0x48, 0x09, 0xd0], disassembly: "or rax,rdx") { $0.putOr(.rax, .rdx) },
  Form(
    name: "sub rax, [rsp+104]", expected: [0x48, 0x2b, 0x44, 0x24, 0x68], disassembly: "sub rax,QWORD PTR [rsp+0x68]"
  ) {
    $0.putSub(.rax, Memory(.rsp, 104))
  },
  Form(name: "lock add [r11], rax", expected: [0xf0, 0x49, 0x01, 0x03], disassembly: "lock add QWORD PTR [r11],rax") {
    $0.putAdd(Memory(.r11), .rax, locked: true)
  },
  Form(name: "call rel32", expected: [0xe8, 0xfb, 0x0f, 0, 0], disassembly: "call 0x101000") {
    try $0.putCall(address: base + 0x1000)
  },
  Form(name: "call rel32 backwards", expected: [0xe8, 0xfb, 0xff, 0xff, 0xff], disassembly: "call 0x100000") {
    try $0.putCall(address: base)
  },
  Form(name: "jmp rel32", expected: [0xe9, 0xfb, 0xff, 0x0f, 0], disassembly: "jmp 0x200000") {
    try $0.putJmp(address: base + 0x10_0000)
  },
  Form(name: "call r11", expected: [0x41, 0xff, 0xd3], disassembly: "call r11") { $0.putCall(.r11) },
  Form(name: "call rax", expected: [0xff, 0xd0], disassembly: "call rax") { $0.putCall(.rax) },
  Form(name: "jmp r8", expected: [0x41, 0xff, 0xe0], disassembly: "jmp r8") { $0.putJmp(.r8) },
  Form(name: "call [rax+8]", expected: [0xff, 0x50, 0x08], disassembly: "call QWORD PTR [rax+0x8]") {
    $0.putCall(Memory(.rax, 8))
  },
  Form(name: "jmp [rip+x]", expected: [0xff, 0x25, 0xfa, 0x0f, 0, 0], disassembly: "jmp QWORD PTR [rip+0xffa]") {
    $0.putJmp(.rip(base + 0x1000))
  },
  Form(name: "ret", expected: [0xc3], disassembly: "ret") { $0.putRet() },
  Form(name: "ret 16", expected: [0xc2, 0x10, 0x00], disassembly: "ret 0x10") { $0.putRet(popping: 16) },
  Form(name: "int3", expected: [0xcc], disassembly: "int3") { $0.putInt3() },
  Form(name: "ud2", expected: [0x0f, 0x0b], disassembly: "ud2") { $0.putUd2() },
  Form(name: "endbr64", expected: [0xf3, 0x0f, 0x1e, 0xfa], disassembly: "endbr64") { $0.putEndbr64() },
  Form(name: "leave", expected: [0xc9], disassembly: "leave") { $0.putLeave() },
  Form(name: "rep movsq", expected: [0xf3, 0x48, 0xa5], disassembly: "rep movs QWORD PTR es:[rdi],QWORD PTR ds:[rsi]") {
    $0.putRepMovsq()
  },
  Form(name: "nop5", expected: [0x0f, 0x1f, 0x44, 0x00, 0x00], disassembly: "nop DWORD PTR [rax+rax*1+0x0]") {
    $0.putNop(count: 5)
  },
]

@Suite struct X86WriterTests {
  @Test(arguments: forms)
  func encodes(_ form: Form) throws {
    var writer = X86Writer(base: base)
    try form.write(&writer)
    let bytes = try writer.finish()
    #expect(bytes == form.expected, "\(form.name): \(hex(bytes)) expected \(hex(form.expected))")
  }

  /// Every form through objdump at once: each line must read as the intended instruction.
  @Test func objdumpAgrees() throws {
    guard let objdump = TestSupport.which("objdump") else { return }
    var writer = X86Writer(base: base)
    var starts: [(Int, Form)] = []
    for form in forms {
      starts.append((writer.bytes.count, form))
      var single = X86Writer(base: writer.pc)
      try form.write(&single)
      writer.emit(try single.finish())
    }
    let directory = try TestSupport.temporaryDirectory("tracery-x86")
    let file = directory.appendingPathComponent("code.bin")
    try Data(writer.bytes).write(to: file)
    let output = try TestSupport.run(
      objdump,
      [
        "-D", "-b", "binary", "-m", "i386:x86-64", "-M", "intel", "--adjust-vma=0x\(String(base, radix: 16))",
        file.path,
      ]
    ).stdout
    var disassembled: [Int: String] = [:]
    for line in output.split(separator: "\n") {
      let fields = line.split(separator: "\t")
      guard fields.count >= 3, let address = Int(fields[0].trimmingCharacters(in: .whitespaces).dropLast(), radix: 16)
      else { continue }
      let text = fields[2...].joined(separator: " ").split(separator: " ", omittingEmptySubsequences: true)
        .joined(separator: " ")
      disassembled[address - Int(base)] = text
    }
    // RIP-relative displacements depend on where each form landed: compare objdump's computed
    // target ("# 0x101000") instead of the displacement.
    func normalised(_ text: String) -> String {
      text.replacingOccurrences(of: "rip\\+0x[0-9a-f]+", with: "rip+D", options: .regularExpression)
    }
    for (offset, form) in starts {
      let text = disassembled[offset] ?? "<nothing>"
      #expect(normalised(text).hasPrefix(normalised(form.disassembly)), "\(form.name): objdump says '\(text)'")
      if form.disassembly.contains("[rip+") { #expect(text.hasSuffix("# 0x101000"), "\(form.name): '\(text)'") }
    }
  }

  @Test func labelsResolveForwardAndBackward() throws {
    var writer = X86Writer(base: base)
    let top = writer.newLabel()
    let done = writer.newLabel()
    writer.bind(top)
    writer.putTest(.rax, .rax)
    writer.putJcc(.equal, done, short: true)
    writer.putSub(.rax, immediate: 1)
    writer.putJmp(top, short: true)
    writer.bind(done)
    writer.putLea(.rcx, .rip(top))
    writer.putCall(done)
    writer.putJcc(.notEqual, top)
    writer.putRet()
    let bytes = try writer.finish()
    #expect(
      bytes == [
        0x48, 0x85, 0xc0,  // test rax, rax
        0x74, 0x06,  // je done
        0x48, 0x83, 0xe8, 0x01,  // sub rax, 1
        0xeb, 0xf5,  // jmp top
        0x48, 0x8d, 0x0d, 0xee, 0xff, 0xff, 0xff,  // lea rcx, [rip - 18]
        0xe8, 0xf4, 0xff, 0xff, 0xff,  // call done (-12)
        0x0f, 0x85, 0xe3, 0xff, 0xff, 0xff,  // jne top (-29)
        0xc3,
      ], "\(hex(bytes))")
  }

  @Test func reportsUnreachableTargets() throws {
    var writer = X86Writer(base: 0x7f00_0000_0000)
    #expect(throws: X86Writer.WriteError.outOfRange(from: 0x7f00_0000_0005, to: 0x1000)) {
      try writer.putCall(address: 0x1000)
    }
    var far = X86Writer(base: base)
    let label = far.newLabel()
    far.putJmp(label, short: true)
    far.putNop(count: 200)
    far.bind(label)
    #expect(throws: X86Writer.WriteError.shortBranchOutOfRange(label: 0, distance: 200)) { try far.finish() }
    var unbound = X86Writer(base: base)
    unbound.putCall(unbound.newLabel())
    #expect(throws: X86Writer.WriteError.unboundLabel(0)) { try unbound.finish() }
    var rip = X86Writer(base: 0x7f00_0000_0000)
    rip.putMov(.rax, .rip(0x1000))
    #expect(throws: X86Writer.WriteError.self) { try rip.finish() }
  }

  @Test func siteShapes() {
    #expect(X86Instruction.SiteShape(bytes: [0x0f, 0x1f, 0x44, 0x00, 0x08], at: 0) == .nop5)
    #expect(X86Instruction.SiteShape(bytes: X86Instruction.nop5, at: 0) == .nop5)
    #expect(X86Instruction.SiteShape(bytes: [0x90, 0x90, 0x90, 0x90, 0x90], at: 0) == .nopSled)
    let call = X86Instruction.call(at: 0x1000, to: 0x2000)!
    #expect(call == [0xe8, 0xfb, 0x0f, 0, 0])
    #expect(X86Instruction.SiteShape(bytes: call, at: 0x1000) == .call(target: 0x2000))
    #expect(
      X86Instruction.SiteShape(bytes: X86Instruction.jmp(at: 0x2000, to: 0x1000)!, at: 0x2000) == .jmp(target: 0x1000))
    #expect(X86Instruction.call(at: 0x7f00_0000_0000, to: 0x1000) == nil)
    #expect(
      X86Instruction.SiteShape(bytes: [0x55, 0x48, 0x89, 0xe5, 0x90], at: 0)
        == .unknown([0x55, 0x48, 0x89, 0xe5, 0x90]))
  }

  @Test func nopsOfEveryLength() throws {
    for count in 0...20 {
      var writer = X86Writer(base: base)
      writer.putNop(count: count)
      #expect(try writer.finish().count == count)
    }
  }
}

func hex(_ bytes: [UInt8]) -> String { bytes.map { String(format: "%02x", $0) }.joined(separator: " ") }
