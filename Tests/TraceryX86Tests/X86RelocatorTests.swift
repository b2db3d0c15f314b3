import Testing

@testable import TraceryX86

/// The relocator on instruction sequences whose copies can be written out by hand; running
/// relocated copies of compiled functions is `RelocationTests` (TraceryCoreTests).
@Suite struct X86RelocatorTests {
  static let address: UInt64 = 0x40_1000
  static let copy: UInt64 = 0x50_0000

  func relocate(_ bytes: [UInt8], to destination: UInt64 = copy, minimum: Int = 5) throws(X86Relocator.Refusal)
    -> X86Relocator.Relocation
  {
    let padded = bytes + [UInt8](repeating: 0xcc, count: 16)
    let result = padded.withUnsafeBytes { raw in
      Result { () throws(X86Relocator.Refusal) in
        try X86Relocator.relocate(raw, at: Self.address, to: destination, minimum: minimum)
      }
    }
    return try result.get()
  }

  func rel32(_ value: Int64) -> [UInt8] { withUnsafeBytes(of: Int32(value).littleEndian) { Array($0) } }

  /// The jmp back to the first instruction not moved, at the end of a copy of `size` bytes.
  func jumpBack(after size: Int, length: Int) -> [UInt8] {
    [0xe9] + rel32(Int64(Self.address) + Int64(length) - (Int64(Self.copy) + Int64(size) + 5))
  }

  @Test func plainInstructionsAreCopiedWhole() throws {
    // push rbp; mov rbp, rsp; sub rsp, 0x10: the first two are 4 bytes, so the third moves too.
    let code: [UInt8] = [0x55, 0x48, 0x89, 0xe5, 0x48, 0x83, 0xec, 0x10]
    let relocation = try relocate(code)
    #expect(relocation.length == 8)
    #expect(relocation.bytes == code + jumpBack(after: 8, length: 8))
    #expect(relocation.boundaries.map(\.original) == [0, 1, 4] && relocation.boundaries.map(\.copy) == [0, 1, 4])
  }

  @Test func ripRelativeOperandsKeepTheirTarget() throws {
    // endbr64; mov eax, [rip + 0x10] (target: end of the mov + 0x10)
    let code: [UInt8] = [0xf3, 0x0f, 0x1e, 0xfa, 0x8b, 0x05, 0x10, 0, 0, 0]
    let relocation = try relocate(code)
    #expect(relocation.length == 10)
    let target = Int64(Self.address) + 10 + 0x10
    let expected = Array(code[0..<6]) + rel32(target - (Int64(Self.copy) + 10))
    #expect(relocation.bytes == expected + jumpBack(after: 10, length: 10))
  }

  @Test func vectorInstructionsMoveToo() throws {
    // movaps [rsp], xmm0; vmovdqu ymm1, [rip + 0x20]
    let code: [UInt8] = [0x0f, 0x29, 0x04, 0x24, 0xc5, 0xfe, 0x6f, 0x0d, 0x20, 0, 0, 0]
    let relocation = try relocate(code)
    #expect(relocation.length == 12)
    let target = Int64(Self.address) + 12 + 0x20
    let expected = Array(code[0..<8]) + rel32(target - (Int64(Self.copy) + 12))
    #expect(relocation.bytes == expected + jumpBack(after: 12, length: 12))
  }

  @Test func shortBranchesBecomeLong() throws {
    // test edi, edi; je +0x20; jmp -0x10
    let code: [UInt8] = [0x85, 0xff, 0x74, 0x20, 0xeb, 0xf0]
    let relocation = try relocate(code)
    #expect(relocation.length == 6)
    let je = Int64(Self.address) + 4 + 0x20
    let jmp = Int64(Self.address) + 6 - 0x10
    let expected: [UInt8] =
      [0x85, 0xff] + [0x0f, 0x84] + rel32(je - (Int64(Self.copy) + 8)) + [0xe9] + rel32(jmp - (Int64(Self.copy) + 13))
    #expect(relocation.bytes == expected + jumpBack(after: 13, length: 6))
    #expect(relocation.boundaries.map(\.copy) == [0, 2, 8])
  }

  @Test func aBranchIntoTheMovedRangeGoesToTheCopy() throws {
    // xor eax, eax; jz +0 (to the nop right after it, which moves too); nop
    let code: [UInt8] = [0x31, 0xc0, 0x74, 0x00, 0x90]
    let relocation = try relocate(code)
    #expect(relocation.length == 5)
    // The jz is 6 bytes in the copy, at 2; the nop at 8.
    #expect(Array(relocation.bytes[2..<8]) == [0x0f, 0x84] + rel32(0))
    #expect(relocation.boundaries.map(\.copy) == [0, 2, 8])
  }

  @Test func aCallPushesTheOriginalReturnAddress() throws {
    let code: [UInt8] = [0xe8] + rel32(0x100)
    let relocation = try relocate(code)
    #expect(relocation.length == 5)
    let returnAddress = Self.address + 5
    let push: [UInt8] =
      [0x48, 0x8d, 0x64, 0x24, 0xf8, 0xc7, 0x04, 0x24]
      + withUnsafeBytes(of: UInt32(returnAddress).littleEndian) { Array($0) }
      + [0xc7, 0x44, 0x24, 0x04, 0, 0, 0, 0]
    let target = Int64(Self.address) + 5 + 0x100
    #expect(
      relocation.bytes == push + [0xe9] + rel32(target - (Int64(Self.copy) + 25)) + jumpBack(after: 25, length: 5))
  }

  /// A loop back to the function's second instruction: moving the first two would leave the
  /// loop's branch pointing into the jmp written over them.
  @Test func branchesIntoTheMovedRangeAreFound() throws {
    // mov rax, rdi; L: lea rax, [rax + rax*2 + 1]; cmp rax, rsi; jl L; ret
    let code: [UInt8] = [0x48, 0x89, 0xf8, 0x48, 0x8d, 0x44, 0x40, 0x01, 0x48, 0x39, 0xf0, 0x7c, 0xf6, 0xc3]
    let relocation = try relocate(code)
    #expect(relocation.length == 8)
    let found = code.withUnsafeBytes {
      X86Relocator.branchesIntoMovedRange(of: $0, at: Self.address, length: relocation.length)
    }
    #expect(found == [11])
    // A branch to the range's start is fine (it then meets the jmp), and so is one to its end.
    let toStart: [UInt8] = [0x48, 0x89, 0xf8, 0x48, 0x8d, 0x44, 0x40, 0x01, 0x7c, 0xf6, 0xeb, 0xfc, 0xc3]
    #expect(toStart.withUnsafeBytes { X86Relocator.branchesIntoMovedRange(of: $0, at: Self.address, length: 8) } == [])
    // Bytes the decoder cannot place: nothing can be said.
    #expect(
      [0x90, 0x0f, 0x0f, 0xc1, 0xb4, 0xc3].withUnsafeBytes {
        X86Relocator.branchesIntoMovedRange(of: $0, at: Self.address, length: 5)
      } == nil)
  }

  @Test func whatCannotMoveIsRefusedWithItsOffset() {
    let cases: [([UInt8], X86Relocator.Refusal)] = [
      ([0x31, 0xc0, 0xc3, 0x48, 0x89, 0xf8], .endsFunction(offset: 2)),  // xor eax, eax; ret; then code
      ([0x90, 0xff, 0xe0, 0x90, 0x90], .indirectBranch(offset: 1)),  // nop; jmp rax; ...
      ([0x31, 0xc0, 0x0f, 0x05, 0x90], .systemCall(offset: 2)),  // xor eax, eax; syscall
      ([0x90, 0xe2, 0xfd, 0x90, 0x90], .loop(offset: 1)),
      ([0x0f, 0x0f, 0xc1, 0xb4, 0x90], .unknownInstruction(offset: 0)),  // 3DNow! pfmul
      ([0x31, 0xc0, 0x74, 0x01, 0x66, 0x90], .intoMiddleOfInstruction(offset: 2)),  // jz into the 2-byte nop
    ]
    for (code, refusal) in cases {
      #expect(throws: refusal, "\(code)") { try relocate(code) }
    }
    // A copy more than 2 GiB away cannot reach the original.
    #expect(throws: X86Relocator.Refusal.outOfReach(offset: 0)) {
      try relocate([0x8b, 0x05, 0x10, 0, 0, 0], to: 0x7f00_0000_0000)
    }
  }

  /// The last instruction moved may end the function, jump indirectly or enter the kernel: its
  /// copy does the same, and nothing after it is overwritten.
  @Test func theLastInstructionMovedMayEndTheFunction() throws {
    // mov rax, rdi; jmp rax: the jump ends the 5 bytes.
    let indirect = try relocate([0x48, 0x89, 0xf8, 0xff, 0xe0])
    #expect(indirect.length == 5 && Array(indirect.bytes.prefix(5)) == [0x48, 0x89, 0xf8, 0xff, 0xe0])
    // A 5-byte function ending in ret moves whole.
    let returning = try relocate([0x5b, 0x5d, 0x41, 0x5c, 0xc3])  // pop rbx; pop rbp; pop r12; ret
    #expect(returning.length == 5 && returning.bytes.prefix(5).last == 0xc3)
    // The first instruction alone (an int3 site): a 1-byte function, and a jmp through the GOT
    // whose operand is re-encoded for the copy.
    let ret = try relocate([0xc3], minimum: 1)
    #expect(ret.length == 1 && ret.bytes.first == 0xc3)
    let thunk = try relocate([0xff, 0x25, 0x10, 0, 0, 0], minimum: 1)  // jmp [rip + 0x10]
    let target = Self.address + 6 + 0x10
    #expect(thunk.length == 6 && Array(thunk.bytes.prefix(2)) == [0xff, 0x25])
    #expect(Array(thunk.bytes[2..<6]) == rel32(Int64(target) - Int64(Self.copy + 6)))
    #expect(throws: X86Relocator.Refusal.loop(offset: 0)) { try relocate([0xe2, 0xfe], minimum: 1) }
  }

  /// A function shorter than the branch whose last instruction is followed by padding (NOPs as
  /// gcc aligns with, or int3 bytes as lld fills with) moves whole: the copy ends with its
  /// `ret` or tail `jmp`, the relocation covers the branch's 5 bytes, and only the moved
  /// instructions are boundaries (nothing runs the padding).
  @Test func aShortFunctionFollowedByPaddingMovesWhole() throws {
    // xor eax, eax; ret; then gcc's `data16 cs nopw 0x0(%rax,%rax,1)`.
    let nops: [UInt8] = [0x66, 0x66, 0x2e, 0x0f, 0x1f, 0x84, 0, 0, 0, 0, 0]
    let returning = try relocate([0x31, 0xc0, 0xc3] + nops)
    #expect(returning.length == 5 && returning.movedEnd == 3)
    #expect(returning.bytes == [0x31, 0xc0, 0xc3] + jumpBack(after: 3, length: 5))
    #expect(returning.boundaries.map(\.original) == [0, 2] && returning.boundaries.map(\.copy) == [0, 2])
    // ret; int3 ...: a one-byte function in int3 fill.
    let one = try relocate([0xc3, 0xcc, 0xcc, 0xcc, 0xcc])
    #expect(one.length == 5 && one.movedEnd == 1 && one.bytes.first == 0xc3)
    // jmp rel8 (a tail call); nop; xchg ax, ax: the jump is re-encoded as rel32.
    let tail = try relocate([0xeb, 0x10, 0x90, 0x66, 0x90])
    let target = Int64(Self.address) + 2 + 0x10
    #expect(tail.movedEnd == 2 && Array(tail.bytes.prefix(5)) == [0xe9] + rel32(target - Int64(Self.copy + 5)))
    // Not padding: `pause` (f3 90), and a NOP that is a prefix of real code is not read as one.
    #expect(throws: X86Relocator.Refusal.endsFunction(offset: 2)) { try relocate([0x31, 0xc0, 0xc3, 0xf3, 0x90]) }
    #expect(throws: X86Relocator.Refusal.endsFunction(offset: 2)) {
      try relocate([0x31, 0xc0, 0xc3, 0x66, 0x31, 0xc0])
    }
    let notPadding = [0x90, 0x55, 0x90].withUnsafeBytes { X86Relocator.isPadding($0, from: 0, to: 3, at: Self.address) }
    #expect(!notPadding)
  }
}
