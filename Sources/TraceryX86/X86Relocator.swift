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
    var bytes: [UInt8] = []
    let relocation = try relocate(
      code, at: address, to: destination, minimum: minimum, appendingTo: &bytes, boundaries: true)
    return Relocation(
      bytes: bytes, length: relocation.length, boundaries: relocation.boundaries, movedEnd: relocation.movedEnd)
  }

  /// `relocate(_:at:to:minimum:)`'s copy appended to `bytes` (its first byte is to land at
  /// `destination`), without the boundaries: returns the `length` and `movedEnd` a `Relocation`
  /// would have. (One buffer for many copies: attaching 50,000 relocated functions relocates
  /// each twice, and arrays per copy were much of that time.)
  public static func relocate(
    _ code: UnsafeRawBufferPointer, at address: UInt64, to destination: UInt64, minimum: Int = 5,
    appendingTo bytes: inout [UInt8]
  ) throws(Refusal) -> (length: Int, movedEnd: Int) {
    let relocation = try relocate(
      code, at: address, to: destination, minimum: minimum, appendingTo: &bytes, boundaries: false)
    return (relocation.length, relocation.movedEnd)
  }

  /// What `relocate(_:at:to:minimum:)` would refuse, or the `length` and `movedEnd` of its copy,
  /// without making it (a copy at the code itself, where every target is in reach: choosing
  /// which functions to relocate). `verbatim`: the copy would be the moved bytes unchanged and
  /// the `jmp` back (`putVerbatim`): no moved instruction branches, calls or addresses
  /// memory relative to rip, and no padding is taken.
  public static func check(
    _ code: UnsafeRawBufferPointer, at address: UInt64, minimum: Int = 5
  ) throws(Refusal) -> (length: Int, movedEnd: Int, verbatim: Bool) {
    // (Apart from `relocate`: no copy is made, so no array and no copy offsets; this runs per
    // function of a large relocating attach.)
    try withUnsafeTemporaryAllocation(of: Moved.self, capacity: max(1, minimum)) {
      moved throws(Refusal) -> (length: Int, movedEnd: Int, verbatim: Bool) in
      let (count, length, movedEnd) = try decode(code, at: address, minimum: minimum, into: moved)
      let instructions = UnsafeMutableBufferPointer(rebasing: moved[..<count])
      // Only what the copy's branches would refuse: a target inside an instruction it moves.
      var verbatim = movedEnd == length
      for entry in instructions {
        switch entry.instruction.flow {
        case .jump(let target), .branch(let target), .call(let target):
          _ = try movedInstruction(at: target, in: instructions, address: address, length: length, from: entry.offset)
          verbatim = false
        case .next, .end, .indirect:
          if entry.instruction.ripDisplacementOffset != nil { verbatim = false }
        }
      }
      return (length, movedEnd, verbatim)
    }
  }

  /// The copy `relocate(_:at:to:minimum:appendingTo:)` makes of `length` bytes at `address` that
  /// `check` found `verbatim`, without decoding them again: the bytes, then `jmp` to `address +
  /// length`, put into `sink` (their first byte to land at `destination`). False (and nothing
  /// put) when the `jmp` is out of reach. (Half the instructions' decoding when 50,000 functions
  /// are attached, and most prologues qualify: pushes, moves, stack adjustments.)
  @inlinable public static func putVerbatim<Sink: CodeSink>(
    _ code: UnsafeRawBufferPointer, at address: UInt64, length: Int, to destination: UInt64, into sink: inout Sink
  ) -> Bool {
    guard let back = X86Writer.rel32(from: destination + UInt64(length + 5), to: address + UInt64(length)) else {
      return false
    }
    // In one piece (a put of a few bytes at a time was most of writing 50,000 prologue stubs).
    sink.write(count: length + 5) { copy in
      copy.copyMemory(from: code.baseAddress!, byteCount: length)
      copy.storeBytes(of: 0xe9, toByteOffset: length, as: UInt8.self)
      copy.storeBytes(of: back.littleEndian, toByteOffset: length + 1, as: Int32.self)
    }
    return true
  }

  /// The moved instructions are decoded into stack memory (at most `minimum` of them: each is a
  /// byte or more); `boundaries` are collected only when asked for.
  private static func relocate(
    _ code: UnsafeRawBufferPointer, at address: UInt64, to destination: UInt64, minimum: Int,
    appendingTo bytes: inout [UInt8], boundaries collect: Bool
  ) throws(Refusal) -> (length: Int, movedEnd: Int, boundaries: [Boundary]) {
    try withUnsafeTemporaryAllocation(of: Moved.self, capacity: max(1, minimum)) {
      moved throws(Refusal) -> (length: Int, movedEnd: Int, boundaries: [Boundary]) in
      let (count, length, movedEnd) = try decode(code, at: address, minimum: minimum, into: moved)
      let instructions = UnsafeMutableBufferPointer(rebasing: moved[..<count])
      // Where each lands in the copy.
      var at = 0
      for index in instructions.indices {
        instructions[index].copy = at
        at += copySize(instructions[index].instruction)
      }
      // A target: outside the range as it is; inside, the copy of the instruction it starts.
      func resolve(_ target: UInt64, from offset: Int) throws(Refusal) -> UInt64 {
        guard
          let start = try movedInstruction(
            at: target, in: instructions, address: address, length: length, from: offset)
        else { return target }
        return destination + UInt64(start.copy)
      }
      func rel32(from end: UInt64, to target: UInt64, offset: Int) throws(Refusal) -> Int32 {
        guard let value = X86Writer.rel32(from: end, to: target) else { throw .outOfReach(offset: offset) }
        return value
      }
      // Written in place (an array per instruction and per branch was most of the time).
      let base = bytes.count
      bytes.reserveCapacity(base + at + 5)
      func putJmp(to target: UInt64, offset: Int) throws(Refusal) {
        bytes.append(0xe9)
        bytes.appendLE(try rel32(from: destination + UInt64(bytes.count - base + 4), to: target, offset: offset))
      }
      for entry in instructions {
        let (offset, instruction) = (entry.offset, entry.instruction)
        let here = destination + UInt64(entry.copy)
        switch instruction.flow {
        case .jump(let target):
          try putJmp(to: try resolve(target, from: offset), offset: offset)
        case .branch(let target):
          bytes.append(0x0f)
          bytes.append(0x80 | instruction.condition!)
          bytes.appendLE(try rel32(from: here + 6, to: try resolve(target, from: offset), offset: offset))
        case .call(let target):
          Self.putPushImmediate64(address + UInt64(offset + instruction.length), into: &bytes)
          try putJmp(to: try resolve(target, from: offset), offset: offset)
        case .next, .end, .indirect:
          let start = bytes.count
          bytes.put(UnsafeRawBufferPointer(rebasing: code[offset..<offset + instruction.length]))
          if let at = instruction.ripDisplacementOffset {
            let raw = (0..<4).reduce(UInt32(0)) { $0 | UInt32(bytes[start + at + $1]) << (8 * $1) }
            let target =
              address + UInt64(offset + instruction.length) &+ UInt64(bitPattern: Int64(Int32(bitPattern: raw)))
            bytes.storeLE(
              try rel32(from: here + UInt64(instruction.length), to: target, offset: offset), at: start + at)
          }
        }
      }
      try putJmp(to: address + UInt64(length), offset: length)
      let boundaries = collect ? instructions.map { Boundary(original: $0.offset, copy: $0.copy) } : []
      return (length, movedEnd, boundaries)
    }
  }

  /// The moved instruction a branch (at `offset`) to `target` lands on; nil when `target` lies
  /// outside the `length` bytes moved from `address`. A target inside them but not at an
  /// instruction's start is refused: its copy would have nowhere to branch.
  private static func movedInstruction(
    at target: UInt64, in instructions: UnsafeMutableBufferPointer<Moved>, address: UInt64, length: Int,
    from offset: Int
  ) throws(Refusal) -> Moved? {
    guard target >= address && target < address + UInt64(length) else { return nil }
    guard let start = instructions.first(where: { UInt64($0.offset) == target - address }) else {
      throw .intoMiddleOfInstruction(offset: offset)
    }
    return start
  }

  /// One moved instruction: where it starts in the original and in the copy.
  private struct Moved {
    var offset: Int
    var instruction: X86Decoder.Instruction
    var copy = 0
  }

  /// The copy's size of `instruction`.
  private static func copySize(_ instruction: X86Decoder.Instruction) -> Int {
    switch instruction.flow {
    case .jump: 5
    case .branch: 6
    case .call: callSequenceSize
    case .next, .end, .indirect: instruction.length
    }
  }

  /// Decodes the instructions covering at least `minimum` bytes into `moved`: returns how many,
  /// the bytes they cover, and where the moved instructions end.
  private static func decode(
    _ code: UnsafeRawBufferPointer, at address: UInt64, minimum: Int, into moved: UnsafeMutableBufferPointer<Moved>
  ) throws(Refusal) -> (count: Int, length: Int, movedEnd: Int) {
    var count = 0
    var offset = 0
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
          moved.initializeElement(at: count, to: Moved(offset: offset, instruction: instruction))
          return (count + 1, minimum, offset + instruction.length)
        }
        if instruction.flow == .end { throw .endsFunction(offset: offset) }
        if instruction.flow == .indirect { throw .indirectBranch(offset: offset) }
        if instruction.isSystemCall { throw .systemCall(offset: offset) }
      }
      if case .branch = instruction.flow, instruction.condition == nil { throw .loop(offset: offset) }
      moved.initializeElement(at: count, to: Moved(offset: offset, instruction: instruction))
      count += 1
      offset += instruction.length
    }
    return (count, offset, offset)
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

  /// `lea rsp, [rsp - 8]; mov dword [rsp], low; mov dword [rsp + 4], high` (flags untouched).
  static func putPushImmediate64(_ value: UInt64, into bytes: inout [UInt8]) {
    for byte: UInt8 in [0x48, 0x8d, 0x64, 0x24, 0xf8, 0xc7, 0x04, 0x24] { bytes.append(byte) }
    bytes.appendLE(UInt32(truncatingIfNeeded: value))
    for byte: UInt8 in [0xc7, 0x44, 0x24, 0x04] { bytes.append(byte) }
    bytes.appendLE(UInt32(truncatingIfNeeded: value >> 32))
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
