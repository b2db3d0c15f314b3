/// The 5-byte instructions a patch site holds, and how to recognise the shapes compilers emit.
public enum X86Instruction {
  /// Intel's recommended NOPs of 1 to 9 bytes (index = length).
  static let nops: [[UInt8]] = [
    [],
    [0x90],
    [0x66, 0x90],
    [0x0f, 0x1f, 0x00],
    [0x0f, 0x1f, 0x40, 0x00],
    [0x0f, 0x1f, 0x44, 0x00, 0x00],
    [0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00],
    [0x0f, 0x1f, 0x80, 0x00, 0x00, 0x00, 0x00],
    [0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00],
    [0x66, 0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00],
  ]

  /// `nopl 0x0(%rax,%rax,1)`: the single 5-byte NOP (what gcc's `-mnop-mcount` and the kernel use).
  public static let nop5: [UInt8] = nops[5]

  /// `endbr64`, which precedes a patch site in code built with `-fcf-protection`.
  public static let endbr64: [UInt8] = [0xf3, 0x0f, 0x1e, 0xfa]
  /// Its length, a constant where code runs per function (the array is a lazily made global).
  @inlinable public static var endbr64Length: Int { 4 }

  /// `call rel32` at `site` to `target`, or nil when out of reach.
  public static func call(at site: UInt64, to target: UInt64) -> [UInt8]? {
    branch(0xe8, at: site, to: target)
  }

  /// `jmp rel32` at `site` to `target`, or nil when out of reach.
  public static func jmp(at site: UInt64, to target: UInt64) -> [UInt8]? {
    branch(0xe9, at: site, to: target)
  }

  private static func branch(_ opcode: UInt8, at site: UInt64, to target: UInt64) -> [UInt8]? {
    guard let rel = X86Writer.rel32(from: site &+ 5, to: target) else { return nil }
    var bytes: [UInt8] = [opcode]
    bytes.appendLE(rel)
    return bytes
  }

  /// The target of a 5-byte `call`/`jmp rel32` at `site`, or nil for other bytes.
  public static func branchTarget(_ bytes: [UInt8], at site: UInt64) -> UInt64? {
    guard bytes.count == 5, bytes[0] == 0xe8 || bytes[0] == 0xe9 else { return nil }
    let rel = Int32(
      bitPattern: UInt32(bytes[1]) | UInt32(bytes[2]) << 8 | UInt32(bytes[3]) << 16 | UInt32(bytes[4]) << 24)
    return site &+ 5 &+ UInt64(bitPattern: Int64(rel))
  }

  /// What the five bytes at a patch site are.
  public enum SiteShape: Sendable, Equatable, CustomStringConvertible {
    /// One 5-byte NOP (`0f 1f 44 00 xx`): clang's `-fpatchable-function-entry`, gcc's
    /// `-mnop-mcount`. Live-patchable with the int3 protocol.
    case nop5
    /// Five 1-byte NOPs (`90` × 5): gcc's `-fpatchable-function-entry=5`. A thread may stop
    /// between them, so it must become one NOP5 while no thread can be inside.
    case nopSled
    /// A `call rel32` (already patched, or gcc `-pg -mfentry` without `-mnop-mcount`).
    case call(target: UInt64)
    /// A `jmp rel32` (already patched).
    case jmp(target: UInt64)
    /// Anything else: not a site Tracery can patch.
    case unknown([UInt8])

    public init(bytes: [UInt8], at site: UInt64) {
      if bytes.count == 5 && bytes[0] == 0x0f && bytes[1] == 0x1f && bytes[2] == 0x44 && bytes[3] == 0x00 {
        self = .nop5
      } else if bytes == [0x90, 0x90, 0x90, 0x90, 0x90] {
        self = .nopSled
      } else if let target = X86Instruction.branchTarget(bytes, at: site) {
        self = bytes[0] == 0xe8 ? .call(target: target) : .jmp(target: target)
      } else {
        self = .unknown(bytes)
      }
    }

    public var description: String {
      switch self {
      case .nop5: return "nop5"
      case .nopSled: return "5×nop sled"
      case .call(let target): return "call 0x\(String(target, radix: 16))"
      case .jmp(let target): return "jmp 0x\(String(target, radix: 16))"
      case .unknown(let bytes): return "unknown bytes " + bytes.map { String($0, radix: 16) }.joined(separator: " ")
      }
    }
  }
}
