/// A 64-bit general-purpose register, numbered as the encoding numbers it.
public enum Register: UInt8, Sendable, CaseIterable {
  case rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8, r9, r10, r11, r12, r13, r14, r15

  /// The three low bits that go into ModRM/SIB or the opcode.
  var low: UInt8 { rawValue & 7 }
  /// Whether the register needs a REX extension bit.
  var extended: Bool { rawValue >= 8 }

  /// The System V integer argument registers, in order.
  public static let arguments: [Register] = [.rdi, .rsi, .rdx, .rcx, .r8, .r9]
}

/// An SSE register.
public struct XMMRegister: Sendable, Equatable, Hashable {
  public let number: UInt8

  public init(_ number: UInt8) {
    precondition(number < 16, "xmm\(number) does not exist")
    self.number = number
  }

  var low: UInt8 { number & 7 }
  var extended: Bool { number >= 8 }
}

/// A memory operand: `[base + displacement]`, or `[rip + displacement]` aimed at an absolute
/// address or a label (resolved against the end of the instruction when the writer knows it).
public struct Memory: Sendable, Equatable {
  enum Base: Sendable, Equatable {
    case register(Register)
    case absolute(UInt64)
    case label(Label)
    /// `fs:[displacement]`: thread-local storage at a fixed offset from the thread pointer.
    case fs
  }

  let base: Base
  let displacement: Int32

  /// `[base + displacement]`.
  public init(_ base: Register, _ displacement: Int32 = 0) {
    self.base = .register(base)
    self.displacement = displacement
  }

  /// `[rip + (address - end of instruction)]`; the address must be within ±2 GiB of the code.
  public static func rip(_ address: UInt64) -> Memory { Memory(base: .absolute(address), displacement: 0) }

  /// `[rip + (label - end of instruction)]`.
  public static func rip(_ label: Label) -> Memory { Memory(base: .label(label), displacement: 0) }

  /// `fs:[offset]`: a thread-local variable at `offset` from the thread pointer.
  public static func fs(_ offset: Int32) -> Memory { Memory(base: .fs, displacement: offset) }

  private init(base: Base, displacement: Int32) {
    self.base = base
    self.displacement = displacement
  }
}

/// A position in the code, bound once with `X86Writer.bind(_:)`.
public struct Label: Sendable, Equatable, Hashable {
  let id: Int
}

/// Condition codes for `jcc`, numbered as the encoding numbers them.
public enum Condition: UInt8, Sendable {
  case overflow = 0, notOverflow, below, aboveOrEqual, equal, notEqual, belowOrEqual, above
  case sign, notSign, parity, notParity, less, greaterOrEqual, lessOrEqual, greater
}
