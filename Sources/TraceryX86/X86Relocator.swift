/// Moves a function's first instructions out of line, so that a 5-byte branch can take their
/// place (what uftrace's dynamic patcher and Frida's relocator do): the whole instructions that
/// cover at least `minimum` bytes are copied to `destination`, re-encoded to run there, and
/// followed by a `jmp` back to the first instruction not moved.
///
/// Re-encoding:
/// - a `[rip + disp32]` operand gets the displacement that reaches the same address from the copy;
/// - `jmp rel8/rel32` becomes `jmp rel32`, `jcc rel8/rel32` becomes `jcc rel32`; a target among
///   the moved instructions is sent to its copy;
/// - `call rel32` becomes a push of the original return address and a `jmp`: the callee returns
///   to the original code (the moved range always ends with the call), and a stack walk (an
///   unwinder, a debugger) sees the stack as the compiler built it.
///
/// Refused, with the instruction's offset: what the decoder does not know (system
/// instructions, ...), and before the last instruction moved: indirect branches,
/// `ret`/`ud2`/`int3`/`hlt` (the function is shorter than the branch) unless only padding
/// follows it up to the minimum (then the copy ends with it, and the relocation covers the
/// minimum), `syscall` (a thread would
/// stop right after it, inside the moved range); anywhere: `loop`/`jrcxz` (no rel32 form), and
/// any target out of rel32 reach of the copy. With `minimum` 1 (the first instruction alone, for
/// an `int3` site) only those last refusals remain.
///
/// What the relocator cannot see is the rest of the program: a branch elsewhere into the moved
/// range's interior, or an exception landing pad there. Its caller checks those.
public enum X86Relocator {
  public enum Refusal: Error, Hashable, Sendable, CustomStringConvertible {
    case unknownInstruction(offset: Int)
    case indirectBranch(offset: Int)
    case endsFunction(offset: Int)
    case systemCall(offset: Int)
    case loop(offset: Int)
    case outOfReach(offset: Int)
    case intoMiddleOfInstruction(offset: Int)

    public var description: String {
      switch self {
      case .unknownInstruction(let offset): "an instruction the decoder does not know at +\(offset)"
      case .indirectBranch(let offset): "an indirect jump or call at +\(offset)"
      case .endsFunction(let offset): "the function ends at +\(offset), before the branch's 5 bytes"
      case .systemCall(let offset): "a system call at +\(offset)"
      case .loop(let offset): "a loop/jrcxz at +\(offset) (no rel32 form)"
      case .outOfReach(let offset): "the instruction at +\(offset) reaches beyond ±2 GiB of the copy"
      case .intoMiddleOfInstruction(let offset): "the branch at +\(offset) goes into the middle of an instruction"
      }
    }
  }

  /// What a refusal is about, without where (for counting refusals by kind).
  public static func kind(of refusal: Refusal) -> String {
    switch refusal {
    case .unknownInstruction: "an instruction the decoder does not know"
    case .indirectBranch: "an indirect jump or call"
    case .endsFunction: "the function ends first"
    case .systemCall: "a system call"
    case .loop: "loop/jrcxz"
    case .outOfReach: "out of rel32 reach"
    case .intoMiddleOfInstruction: "a branch into an instruction"
    }
  }

  /// Where one moved instruction starts, in the original and in the copy.
  public struct Boundary: Equatable, Sendable {
    public let original: Int
    public let copy: Int
  }

  public struct Relocation: Equatable, Sendable {
    /// The copy: the moved instructions re-encoded, then `jmp` to the original + `length`.
    public let bytes: [UInt8]
    /// How many bytes of the original the moved instructions cover (at least the minimum).
    public let length: Int
    /// One per moved instruction, in order: where a thread stopped in the original range goes.
    public let boundaries: [Boundary]
    /// Where the moved instructions end: `length`, or less when padding after a function's
    /// last instruction makes up the rest (the copy ends with that instruction; its `jmp` back
    /// is never reached).
    public let movedEnd: Int
  }

  /// The relocation of the code at `address` (its bytes from there on: `code`, at least 15 past
  /// the last instruction it may need) into a copy at `destination`.
  public static func relocate(
    _ code: UnsafeRawBufferPointer, at address: UInt64, to destination: UInt64, minimum: Int = 5
  ) throws(Refusal) -> Relocation {
    // Decode the range first: branch targets among the moved instructions need their copies.
    var moved: [(offset: Int, instruction: X86Decoder.Instruction)] = []
    var offset = 0
    var movedEnd: Int?
    while offset < minimum {
      let rest = UnsafeRawBufferPointer(rebasing: code[offset..<min(code.count, offset + 15)])
      guard let instruction = X86Decoder.decode(rest, at: address + UInt64(offset)) else {
        throw .unknownInstruction(offset: offset)
      }
      // The last instruction moved may end the function, branch indirectly or enter the kernel:
      // its copy does the same, and nothing after it is overwritten (a thread blocked in its
      // system call resumes after the moved range). Before the last, each would leave bytes that
      // the branch overwrites: code past the function's end, or a return into the moved range.
      if offset + instruction.length < minimum {
        // A function shorter than the branch whose last instruction (`ret`, a tail `jmp`) is
        // followed by padding: it moves whole, and the branch takes padding bytes past its end,
        // which nothing runs unless a branch enters them (the caller checks that, and that no
        // other function starts there).
        var ends = instruction.flow == .end
        if case .jump = instruction.flow { ends = true }
        if ends, isPadding(code, from: offset + instruction.length, to: minimum, at: address) {
          moved.append((offset, instruction))
          movedEnd = offset + instruction.length
          offset = minimum
          break
        }
        if instruction.flow == .end { throw .endsFunction(offset: offset) }
        if instruction.flow == .indirect { throw .indirectBranch(offset: offset) }
        if instruction.isSystemCall { throw .systemCall(offset: offset) }
      }
      if case .branch = instruction.flow, instruction.condition == nil { throw .loop(offset: offset) }
      moved.append((offset, instruction))
      offset += instruction.length
    }
    let length = offset
    // The copy's size of each instruction, hence where each lands.
    func copySize(_ instruction: X86Decoder.Instruction) -> Int {
      switch instruction.flow {
      case .jump: 5
      case .branch: 6
      case .call: Self.callSequenceSize
      case .next, .end, .indirect: instruction.length
      }
    }
    var boundaries: [Boundary] = []
    var at = 0
    for (offset, instruction) in moved {
      boundaries.append(Boundary(original: offset, copy: at))
      at += copySize(instruction)
    }
    // A target: outside the range as it is; inside, the copy of the instruction it starts.
    func resolve(_ target: UInt64, from offset: Int) throws(Refusal) -> UInt64 {
      guard target >= address && target < address + UInt64(length) else { return target }
      guard let boundary = boundaries.first(where: { UInt64($0.original) == target - address }) else {
        throw .intoMiddleOfInstruction(offset: offset)
      }
      return destination + UInt64(boundary.copy)
    }
    func rel32(from end: UInt64, to target: UInt64, offset: Int) throws(Refusal) -> Int32 {
      guard let value = X86Writer.rel32(from: end, to: target) else { throw .outOfReach(offset: offset) }
      return value
    }
    func jmp(at here: UInt64, to target: UInt64, offset: Int) throws(Refusal) -> [UInt8] {
      guard let bytes = X86Instruction.jmp(at: here, to: target) else { throw .outOfReach(offset: offset) }
      return bytes
    }
    var bytes: [UInt8] = []
    for ((offset, instruction), boundary) in zip(moved, boundaries) {
      let here = destination + UInt64(boundary.copy)
      switch instruction.flow {
      case .jump(let target):
        bytes += try jmp(at: here, to: try resolve(target, from: offset), offset: offset)
      case .branch(let target):
        bytes += [0x0f, 0x80 | instruction.condition!]
        bytes.appendLE(try rel32(from: here + 6, to: try resolve(target, from: offset), offset: offset))
      case .call(let target):
        bytes += Self.pushImmediate64(address + UInt64(offset + instruction.length))
        let jmpAt = here + UInt64(Self.callSequenceSize - 5)
        bytes += try jmp(at: jmpAt, to: try resolve(target, from: offset), offset: offset)
      case .next, .end, .indirect:
        var copied = Array(code[offset..<offset + instruction.length])
        if let at = instruction.ripDisplacementOffset {
          let raw = (0..<4).reduce(UInt32(0)) { $0 | UInt32(copied[at + $1]) << (8 * $1) }
          let target =
            address + UInt64(offset + instruction.length) &+ UInt64(bitPattern: Int64(Int32(bitPattern: raw)))
          copied.storeLE(try rel32(from: here + UInt64(instruction.length), to: target, offset: offset), at: at)
        }
        bytes += copied
      }
    }
    bytes += try jmp(at: destination + UInt64(bytes.count), to: address + UInt64(length), offset: length)
    return Relocation(bytes: bytes, length: length, boundaries: boundaries, movedEnd: movedEnd ?? length)
  }

  /// Whether the bytes of `code` from `start` up to `end` belong to padding: `int3` bytes and
  /// NOP instructions (`90`, `0f 1f /0`, with operand-size and segment prefixes), as compilers
  /// and assemblers align the next function with; the last may run past `end`.
  static func isPadding(_ code: UnsafeRawBufferPointer, from start: Int, to end: Int, at address: UInt64) -> Bool {
    var offset = start
    while offset < end {
      guard offset < code.count else { return false }
      if code[offset] == 0xcc {
        offset += 1
        continue
      }
      var opcode = offset
      while opcode < code.count, [0x66, 0x2e, 0x3e, 0x26, 0x36, 0x64, 0x65].contains(code[opcode]) { opcode += 1 }
      guard opcode < code.count,
        code[opcode] == 0x90 || (opcode + 1 < code.count && code[opcode] == 0x0f && code[opcode + 1] == 0x1f),
        let instruction = X86Decoder.decode(
          UnsafeRawBufferPointer(rebasing: code[offset..<min(code.count, offset + 15)]), at: address + UInt64(offset)),
        instruction.flow == .next
      else { return false }
      offset += instruction.length
    }
    return true
  }

  /// `lea rsp, [rsp - 8]; mov dword [rsp], low; mov dword [rsp + 4], high`: a 64-bit push that
  /// leaves the flags alone, then the call's `jmp rel32`.
  static let callSequenceSize = 5 + 7 + 8 + 5

  static func pushImmediate64(_ value: UInt64) -> [UInt8] {
    var bytes: [UInt8] = [0x48, 0x8d, 0x64, 0x24, 0xf8, 0xc7, 0x04, 0x24]
    bytes.appendLE(UInt32(truncatingIfNeeded: value))
    bytes += [0xc7, 0x44, 0x24, 0x04]
    bytes.appendLE(UInt32(truncatingIfNeeded: value >> 32))
    return bytes
  }
}

extension X86Relocator {
  /// The offsets (in `function`, which starts at `address`) of the direct branches that go into
  /// the interior of a moved range of `length` bytes there — to address + 1 ..< address +
  /// `length`: after the move those bytes hold the branch's displacement, so such a function
  /// cannot be moved. A linear sweep of the whole function; nil when it meets bytes the decoder
  /// cannot place (then nothing can be said).
  public static func branchesIntoMovedRange(
    of function: UnsafeRawBufferPointer, at address: UInt64, length: Int
  ) -> [Int]? {
    var found: [Int] = []
    var offset = 0
    while offset < function.count {
      let rest = UnsafeRawBufferPointer(rebasing: function[offset..<min(function.count, offset + 15)])
      guard let instruction = X86Decoder.decode(rest, at: address + UInt64(offset)) else { return nil }
      switch instruction.flow {
      case .jump(let target), .branch(let target), .call(let target):
        if target > address && target < address + UInt64(length) { found.append(offset) }
      case .next, .end, .indirect:
        break
      }
      offset += instruction.length
    }
    return found
  }
}
