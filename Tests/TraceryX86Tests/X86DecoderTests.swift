import Foundation
import Testing
import TraceryTestSupport

@testable import TraceryX86

/// The decoder against objdump: on every instruction of real compiled code (integer, x87, SSE,
/// AVX, AVX-512) it must either give up (nil) or agree on the length, the branch target and the
/// RIP-relative operand's target.
@Suite struct X86DecoderTests {
  /// One line of `objdump -d --insn-width=16`: address, bytes, text.
  struct Listed {
    let address: UInt64
    let bytes: [UInt8]
    let text: String
  }

  static func disassemble(_ path: String) throws -> [Listed] {
    let result = try TestSupport.run(TestSupport.which("objdump")!, ["-d", "--insn-width=16", path])
    #expect(result.status == 0)
    var listed: [Listed] = []
    for line in result.stdout.split(separator: "\n") {
      let fields = line.split(separator: "\t", omittingEmptySubsequences: false)
      guard fields.count >= 3, fields[0].hasSuffix(":"),
        let address = UInt64(fields[0].dropLast().trimmingCharacters(in: .whitespaces), radix: 16)
      else { continue }
      let bytes = fields[1].split(separator: " ").compactMap { UInt8($0, radix: 16) }
      listed.append(Listed(address: address, bytes: bytes, text: String(fields[2])))
    }
    return listed
  }

  /// Checks every listed instruction; returns how many the decoder knew.
  static func check(_ listed: [Listed], in name: String) -> Int {
    var known = 0
    for (index, instruction) in listed.enumerated() where !instruction.bytes.isEmpty {
      // The bytes that follow too, as in memory: a decoder that reads too far must show it.
      var bytes = instruction.bytes
      for following in listed[(index + 1)...].prefix(3)
      where following.address == instruction.address + UInt64(instruction.bytes.count) {
        bytes += following.bytes
      }
      let decoded = bytes.prefix(15).withUnsafeBytes { X86Decoder.decode($0, at: instruction.address) }
      guard let decoded else { continue }
      known += 1
      #expect(
        decoded.length == instruction.bytes.count,
        "\(name) 0x\(String(instruction.address, radix: 16)): \(instruction.text) is \(instruction.bytes.count) bytes, decoded \(decoded.length)"
      )
      // objdump writes a direct target as the operand's first hex number.
      let target: UInt64?
      switch decoded.flow {
      case .jump(let address), .branch(let address), .call(let address): target = address
      case .next, .end, .indirect: target = nil
      }
      if let target {
        let operand = instruction.text.split(separator: " ", omittingEmptySubsequences: true).dropFirst().first
        #expect(
          operand.flatMap { UInt64($0, radix: 16) } == target,
          "\(name) 0x\(String(instruction.address, radix: 16)): \(instruction.text) decoded target 0x\(String(target, radix: 16))"
        )
      }
      // A RIP-relative operand: objdump names its target after '#'.
      let ripRelative = instruction.text.contains("(%rip)")
      #expect(
        (decoded.ripDisplacementOffset != nil) == ripRelative,
        "\(name) 0x\(String(instruction.address, radix: 16)): \(instruction.text), decoded \(String(describing: decoded.ripDisplacementOffset))"
      )
      if let offset = decoded.ripDisplacementOffset, ripRelative, offset + 4 <= instruction.bytes.count {
        let raw = (0..<4).reduce(UInt32(0)) { $0 | UInt32(instruction.bytes[offset + $1]) << (8 * $1) }
        let end = instruction.address + UInt64(instruction.bytes.count)
        let computed = end &+ UInt64(bitPattern: Int64(Int32(bitPattern: raw)))
        let named = instruction.text.split(separator: "#").last.flatMap {
          UInt64($0.trimmingCharacters(in: .whitespaces).split(separator: " ").first ?? "", radix: 16)
        }
        #expect(named == computed, "\(name) 0x\(String(instruction.address, radix: 16)): \(instruction.text)")
      }
      // A condition exactly on the jcc forms (objdump: j + condition, not jmp).
      let isJcc =
        instruction.text.hasPrefix("j") && !instruction.text.hasPrefix("jmp")
        && !instruction.text.hasPrefix("jrcxz") && !instruction.text.hasPrefix("jecxz")
      #expect(
        (decoded.condition != nil) == isJcc, "\(name) 0x\(String(instruction.address, radix: 16)): \(instruction.text)")
    }
    return known
  }

  static let corpus = """
    #include <setjmp.h>
    #include <stdarg.h>
    #include <stdint.h>
    #include <string.h>
    long mix(long a, long b) { return (a * 7 + (b >> 3)) ^ (a / (b | 1)) ^ (a % 13); }
    int cases(int x) { switch (x) { case 0: return 5; case 1: return 9; case 2: return 1; case 3: return 42; case 4: return 7; default: return -1; } }
    unsigned bits(uint64_t x) { return __builtin_popcountll(x) + __builtin_ctzll(x | 1) + __builtin_clzll(x | 1); }
    uint16_t narrow(uint16_t a, int8_t b) { return (uint16_t)(a * b + (a >> 2)); }
    long loop(const long *v, long n) { long s = 0; for (long i = 0; i < n; i++) s += v[i] * (i & 3); return s; }
    void copy(char *d, const char *s, unsigned long n) { memcpy(d, s, n); memset(d + n, 0, 64); }
    double scale(double x, float y, long n) { return x * y + (double)n; }
    long sum(int count, ...) { va_list list; va_start(list, count); long s = 0; for (int i = 0; i < count; i++) s += va_arg(list, long); va_end(list); return s; }
    long cas(long *p, long v) { long expected = 0; __atomic_compare_exchange_n(p, &expected, v, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); return __atomic_fetch_add(p, 1, __ATOMIC_RELAXED) + expected; }
    static jmp_buf buffer;
    int jumps(int x) { if (setjmp(buffer)) return 1; if (x > 3) longjmp(buffer, 1); return 0; }
    long (*pick(int x))(long, long) { return x ? mix : 0; }
    long indirect(long (*f)(long, long), long a) { return f(a, a + 1) + 1; }
    int main(int argc, char **argv) { (void)argv; return (int)mix(argc, 3) + cases(argc) + (int)scale(argc, 2.0f, 3); }
    """

  @Test(arguments: [
    ("gcc", ["-O2"]), ("gcc", ["-Os", "-fcf-protection=full"]), ("clang", ["-O2", "-mpopcnt"]),
    ("clang", ["-O0"]), ("clang", ["-O3", "-mavx2"]),
  ])
  func agreesWithObjdumpOnCompiledCode(compiler: String, flags: [String]) throws {
    let directory = try TestSupport.temporaryDirectory("tracery-decoder")
    defer { try? FileManager.default.removeItem(at: directory) }
    let source = directory.appendingPathComponent("corpus.c").path
    try Self.corpus.write(toFile: source, atomically: true, encoding: .utf8)
    let program = directory.appendingPathComponent("corpus").path
    try TestSupport.compile(compiler: compiler, sources: [source], flags: flags, output: program)
    let listed = try Self.disassemble(program)
    #expect(listed.count > 200)
    let known = Self.check(listed, in: "\(compiler) \(flags)")
    // Compiled code: the decoder must know nearly all of it (what it does not: the PLT's and
    // the indirect calls' jumps through memory or registers).
    #expect(Double(known) > 0.95 * Double(listed.count), "knew \(known) of \(listed.count)")
  }

  /// The C library: hand-written assembly, every vector extension the machine has, and a few
  /// hundred thousand instructions.
  @Test func agreesWithObjdumpOnTheCLibrary() throws {
    let library = try #require(TestSupport.cLibraryPath())
    let listed = try Self.disassemble(library)
    #expect(listed.count > 100_000)
    let known = Self.check(listed, in: "libc")
    #expect(Double(known) > 0.97 * Double(listed.count), "knew \(known) of \(listed.count)")
  }

  @Test func shapesItMustKnowAndRefuse() {
    func decode(_ bytes: [UInt8], at address: UInt64 = 0x1000) -> X86Decoder.Instruction? {
      bytes.withUnsafeBytes { X86Decoder.decode($0, at: address) }
    }
    #expect(decode([0xc3]) == .init(length: 1, flow: .end))
    #expect(decode([0xf3, 0x0f, 0x1e, 0xfa]) == .init(length: 4, flow: .next))  // endbr64
    #expect(decode([0x0f, 0x1f, 0x44, 0x00, 0x00]) == .init(length: 5, flow: .next))  // nop5
    #expect(decode([0xe8, 0x10, 0x00, 0x00, 0x00]) == .init(length: 5, flow: .call(0x1015)))
    #expect(decode([0x74, 0xfe]) == .init(length: 2, flow: .branch(0x1000), condition: 4))
    #expect(decode([0x48, 0xb8, 1, 2, 3, 4, 5, 6, 7, 8]) == .init(length: 10, flow: .next))  // movabs
    #expect(decode([0x66, 0xb8, 1, 2]) == .init(length: 4, flow: .next))  // mov ax, imm16
    // mov eax, [rip + 0x10]; lea rdi, [rip - 4]; cmp byte [rip + 8], 1 (an immediate after it)
    #expect(decode([0x8b, 0x05, 0x10, 0, 0, 0])?.ripDisplacementOffset == 2)
    #expect(decode([0x48, 0x8d, 0x3d, 0xfc, 0xff, 0xff, 0xff])?.ripDisplacementOffset == 3)
    #expect(decode([0x80, 0x3d, 0x08, 0, 0, 0, 0x01]) == .init(length: 7, flow: .next, ripDisplacementOffset: 2))
    // je rel8 and jne rel32 carry their condition; loop does not (it has no rel32 form).
    #expect(decode([0x74, 0x02])?.condition == 4)
    #expect(decode([0x0f, 0x85, 0, 0, 0, 0])?.condition == 5)
    #expect(decode([0xe2, 0xfe]) == .init(length: 2, flow: .branch(0x1000)))
    #expect(decode([0x0f, 0x05])?.isSystemCall == true)
    // movaps [rsp], xmm0; vzeroupper; fld dword [rsp]; ldmxcsr [rsp]; pshufd xmm0, xmm1, 0x1b;
    // vmovdqu ymm0, [rip + 0x10]; vpternlogd zmm0, zmm1, zmm2, 0xff (EVEX, 0F3A map)
    #expect(decode([0x0f, 0x29, 0x04, 0x24])?.length == 4)
    #expect(decode([0xc5, 0xf8, 0x77])?.length == 3)
    #expect(decode([0xd9, 0x04, 0x24])?.length == 3)
    #expect(decode([0x0f, 0xae, 0x14, 0x24])?.length == 4)
    #expect(decode([0x66, 0x0f, 0x70, 0xc1, 0x1b])?.length == 5)
    #expect(decode([0xc5, 0xfe, 0x6f, 0x05, 0x10, 0, 0, 0]) == .init(length: 8, flow: .next, ripDisplacementOffset: 4))
    #expect(decode([0x62, 0xf3, 0x75, 0x48, 0x25, 0xc2, 0xff])?.length == 7)
    // An indirect call, a jump through memory: lengths only.
    #expect(decode([0xff, 0xd0]) == .init(length: 2, flow: .indirect))
    #expect(decode([0xff, 0x25, 0x10, 0, 0, 0]) == .init(length: 6, flow: .indirect, ripDisplacementOffset: 2))
    // XOP, a REX before VEX, ff /7.
    for bytes: [UInt8] in [[0x8f, 0xe9, 0x78, 0x01, 0xc0], [0x48, 0xc5, 0xf8, 0x77], [0xff, 0xf8]] {
      #expect(decode(bytes) == nil, "\(bytes)")
    }
    // Truncated: the bytes end inside the instruction.
    #expect(decode([0xe8, 0x10, 0x00]) == nil)
    #expect(decode([0x48, 0x8b, 0x84, 0x24]) == nil)
  }
}
