/// Writes x86-64 machine code, one method per instruction form that Tracery's trampolines use.
///
/// The writer keeps two positions apart: `bytes` is where code is written (any buffer), `pc` is
/// the address where that code will run. rel32 branches and RIP-relative operands are computed
/// against `pc`, so code can be written into a writable alias and copied or mapped into place.
/// Labels may be used before they are bound; `finish()` resolves them and fails if a target is
/// unbound or out of reach.
public struct X86Writer: Sendable {
  public enum WriteError: Error, Equatable, CustomStringConvertible {
    /// A rel32 target further than ±2 GiB from the instruction.
    case outOfRange(from: UInt64, to: UInt64)
    /// A rel8 branch whose label is further than ±127 bytes.
    case shortBranchOutOfRange(label: Int, distance: Int64)
    case unboundLabel(Int)

    public var description: String {
      switch self {
      case .outOfRange(let from, let to):
        return "target 0x\(String(to, radix: 16)) is out of rel32 reach of 0x\(String(from, radix: 16))"
      case .shortBranchOutOfRange(let label, let distance):
        return "short branch to label \(label) spans \(distance) bytes"
      case .unboundLabel(let label): return "label \(label) was never bound"
      }
    }
  }

  enum Fixup: Sendable {
    /// A rel32 field at `offset` whose displacement is measured from `end`.
    case rel32(offset: Int, end: Int, label: Label)
    case rel8(offset: Int, end: Int, label: Label)
    case rel32Absolute(offset: Int, end: Int, target: UInt64)
  }

  /// The code written so far.
  public internal(set) var bytes: [UInt8] = []
  /// The address where `bytes[0]` will run.
  public let base: UInt64
  var labels: [Int?] = []
  var fixups: [Fixup] = []

  public init(base: UInt64) {
    self.base = base
  }

  /// The address of the next byte to be written.
  public var pc: UInt64 { base &+ UInt64(bytes.count) }

  public mutating func newLabel() -> Label {
    labels.append(nil)
    return Label(id: labels.count - 1)
  }

  public mutating func bind(_ label: Label) {
    precondition(labels[label.id] == nil, "label bound twice")
    labels[label.id] = bytes.count
  }

  /// Resolves every label and absolute rel32 field and returns the finished code.
  public func finish() throws(WriteError) -> [UInt8] {
    var code = bytes
    for fixup in fixups {
      switch fixup {
      case .rel32(let offset, let end, let label):
        guard let target = labels[label.id] else { throw .unboundLabel(label.id) }
        code.storeLE(Int32(target - end), at: offset)
      case .rel8(let offset, let end, let label):
        guard let target = labels[label.id] else { throw .unboundLabel(label.id) }
        let distance = target - end
        guard let short = Int8(exactly: distance) else {
          throw .shortBranchOutOfRange(label: label.id, distance: Int64(distance))
        }
        code[offset] = UInt8(bitPattern: short)
      case .rel32Absolute(let offset, let end, let target):
        let from = base &+ UInt64(end)
        guard let rel = X86Writer.rel32(from: from, to: target) else { throw .outOfRange(from: from, to: target) }
        code.storeLE(rel, at: offset)
      }
    }
    return code
  }

  /// `to - from` as a rel32, or nil when it does not fit.
  public static func rel32(from: UInt64, to: UInt64) -> Int32? {
    Int32(exactly: Int64(bitPattern: to &- from))
  }

  // MARK: - Raw emission (internal)

  mutating func emit(_ byte: UInt8) { bytes.append(byte) }
  mutating func emit(_ some: [UInt8]) { bytes.append(contentsOf: some) }
  mutating func emit32(_ value: Int32) { bytes.appendLE(value) }
  mutating func emit64(_ value: UInt64) { bytes.appendLE(value) }

  /// The REX prefix, emitted only when some bit of it is set.
  mutating func rex(w: Bool, r: Bool = false, x: Bool = false, b: Bool = false) {
    let value: UInt8 = 0x40 | (w ? 8 : 0) | (r ? 4 : 0) | (x ? 2 : 0) | (b ? 1 : 0)
    if value != 0x40 { emit(value) }
  }

  /// ModRM (+SIB, +displacement) for `reg` field `reg` and memory operand `memory`. `trailing` is
  /// the number of immediate bytes that follow, needed for RIP-relative displacements.
  mutating func modRM(reg: UInt8, memory: Memory, trailing: Int = 0) {
    switch memory.base {
    case .register(let base):
      let disp = memory.displacement
      let mod: UInt8
      if disp == 0 && base.low != 5 {
        mod = 0
      } else if Int8(exactly: disp) != nil {
        mod = 1
      } else {
        mod = 2
      }
      emit(mod << 6 | (reg & 7) << 3 | base.low)
      // rsp and r12 as a base need a SIB byte (index none, base itself).
      if base.low == 4 { emit(0x24) }
      if mod == 1 { emit(UInt8(bitPattern: Int8(disp))) }
      if mod == 2 { emit32(disp) }
    case .absolute(let target):
      emit((reg & 7) << 3 | 5)
      let offset = bytes.count
      emit32(0)
      fixups.append(.rel32Absolute(offset: offset, end: offset + 4 + trailing, target: target))
    case .label(let label):
      emit((reg & 7) << 3 | 5)
      let offset = bytes.count
      emit32(0)
      fixups.append(.rel32(offset: offset, end: offset + 4 + trailing, label: label))
    case .fs:
      // mod 00, rm 100, SIB (no base, no index) + disp32: an absolute address in the segment.
      emit((reg & 7) << 3 | 4)
      emit(0x25)
      emit32(memory.displacement)
    }
  }

  /// Every one-byte-opcode form with a memory operand: segment prefix, REX (REX.W when `wide`),
  /// `opcode`, ModRM (+SIB, +displacement). `reg` is the register operand's number or the
  /// opcode's /digit; `trailing` is the number of immediate bytes the caller emits next.
  mutating func putMemoryForm(
    _ opcode: UInt8, reg: UInt8, extended: Bool = false, memory: Memory, wide: Bool = true, trailing: Int = 0
  ) {
    segmentPrefix(memory)
    rex(w: wide, r: extended, b: baseExtended(memory))
    emit(opcode)
    modRM(reg: reg, memory: memory, trailing: trailing)
  }

  /// `opcode register, memory` or `opcode memory, register` (64-bit).
  mutating func putMemoryForm(_ opcode: UInt8, _ register: Register, _ memory: Memory) {
    putMemoryForm(opcode, reg: register.rawValue, extended: register.extended, memory: memory)
  }

  /// The segment-override prefix a memory operand needs; it must precede any REX prefix.
  mutating func segmentPrefix(_ memory: Memory) {
    if case .fs = memory.base { emit(0x64) }
  }

  func baseExtended(_ memory: Memory) -> Bool {
    if case .register(let base) = memory.base { return base.extended }
    return false
  }
}

/// Where generated bytes go, one piece after another: an array, or a code block written in
/// place (`CodeArena.Block.Writer`). (Inlinable: unspecialized, a call from another module went
/// through the generic integer protocols per byte.)
public protocol CodeSink {
  mutating func put(_ byte: UInt8)
  mutating func put(_ bytes: UnsafeRawBufferPointer)
  /// `count` bytes that `body` writes in place, all of them: one reservation for a small
  /// record, where puts of a few bytes each cost more than the bytes.
  mutating func write(count: Int, _ body: (UnsafeMutableRawPointer) -> Void)
}

extension CodeSink {
  /// `value`'s bytes, least significant first (x86's order).
  @inlinable public mutating func putLE<T: FixedWidthInteger>(_ value: T) {
    Swift.withUnsafeBytes(of: value.littleEndian) { put($0) }
  }
}

extension Array: CodeSink where Element == UInt8 {
  @inlinable public mutating func put(_ byte: UInt8) { append(byte) }

  /// `append(contentsOf:)` for raw bytes, as one copy: a raw buffer offers no typed contiguous
  /// storage, so the generic append took it a byte at a time (a sixteenth of attaching 50,000
  /// relocated functions).
  @inlinable public mutating func put(_ bytes: UnsafeRawBufferPointer) {
    guard let base = bytes.baseAddress, !bytes.isEmpty else { return }
    append(contentsOf: UnsafeBufferPointer(start: base.assumingMemoryBound(to: UInt8.self), count: bytes.count))
  }

  @inlinable public mutating func write(count: Int, _ body: (UnsafeMutableRawPointer) -> Void) {
    let start = self.count
    append(contentsOf: repeatElement(0, count: count))
    withUnsafeMutableBytes { body($0.baseAddress! + start) }
  }

  @inlinable public mutating func appendLE<T: FixedWidthInteger>(_ value: T) { putLE(value) }

  mutating func storeLE<T: FixedWidthInteger>(_ value: T, at offset: Int) {
    Swift.withUnsafeBytes(of: value.littleEndian) { raw in
      for (index, byte) in raw.enumerated() { self[offset + index] = byte }
    }
  }
}
