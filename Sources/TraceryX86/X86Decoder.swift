/// A conservative x86-64 decoder: it knows the lengths, control flow and RIP-relative operands of
/// the instructions compilers emit — integer, x87, SSE (legacy and VEX/EVEX-encoded AVX,
/// AVX-512) — and answers nil for system instructions and bytes it cannot place. Indirect
/// branches are known by length only (`Flow.indirect`). Its user, `X86Relocator`, moves a function's
/// first instructions out of line; nil means "do not move this": an instruction it does not know
/// is never copied as if harmless. Checked against objdump on compiled code and the C library.
public enum X86Decoder {
  /// Where execution goes after an instruction.
  public enum Flow: Equatable, Sendable {
    /// To the next instruction.
    case next
    /// Only to the target (`jmp rel`).
    case jump(UInt64)
    /// To the target or the next instruction (`jcc`, `loop`, `jrcxz`).
    case branch(UInt64)
    /// Into the target, then (when it returns) to the next instruction (`call rel32`).
    case call(UInt64)
    /// Nowhere in this function: `ret`, `ud2`, `int3`, `hlt`.
    case end
    /// Through a register or memory (`jmp`/`call` r/m): where, only the running code knows.
    case indirect
  }

  public struct Instruction: Equatable, Sendable {
    public let length: Int
    public let flow: Flow
    /// (Small fields stored plainly, not as optionals: the relocator copies each decoded
    /// instruction, and the optionals' odd-sized layout made that copy wait on the stores that
    /// built it.)
    private let ripOffset: Int8
    private let conditionCode: UInt8
    /// `syscall`: a thread can stop right after it, blocked in the kernel.
    public let isSystemCall: Bool

    init(
      length: Int, flow: Flow, ripDisplacementOffset: Int? = nil, condition: UInt8? = nil, isSystemCall: Bool = false
    ) {
      self.length = length
      self.flow = flow
      ripOffset = Int8(ripDisplacementOffset ?? -1)
      conditionCode = condition ?? 0xff
      self.isSystemCall = isSystemCall
    }

    /// Where its RIP-relative 32-bit displacement starts (bytes into the instruction), when it
    /// has a `[rip + disp32]` operand.
    public var ripDisplacementOffset: Int? { ripOffset < 0 ? nil : Int(ripOffset) }
    /// The condition (0-15, as `jcc` numbers them) of a conditional branch that has a rel32 form;
    /// nil for every other instruction, and for `loop`/`jrcxz` (rel8 only).
    public var condition: UInt8? { conditionCode == 0xff ? nil : conditionCode }
  }

  /// The instruction at `address`, whose bytes (up to 15 of them, fewer at the end of the
  /// code) are `bytes`; nil when it is not a general-purpose instruction this decoder knows.
  public static func decode(_ bytes: UnsafeRawBufferPointer, at address: UInt64) -> Instruction? {
    var reader = Reader(bytes: bytes)
    return reader.instruction(at: address)
  }

  private struct Reader {
    let bytes: UnsafeRawBufferPointer
    /// How far it may read: the bytes, at most 15 (the longest instruction).
    let limit: Int
    var index = 0
    var operandSize16 = false
    var addressSize32 = false
    var repeatPrefix: UInt8 = 0
    var rexW = false
    var ripDisplacement: Int?
    var condition: UInt8?
    var systemCall = false
    var rexSeen = false

    init(bytes: UnsafeRawBufferPointer) {
      self.bytes = bytes
      limit = min(bytes.count, 15)
    }

    @inline(__always) mutating func next() -> UInt8? {
      guard index < limit else { return nil }
      defer { index += 1 }
      return bytes[index]
    }

    func peek(_ offset: Int = 0) -> UInt8? {
      index + offset < bytes.count ? bytes[index + offset] : nil
    }

    /// Consumes a ModRM byte and its SIB and displacement; returns the ModRM's `reg` field.
    @inline(__always) mutating func modRM(mustBeMemory: Bool = false) -> UInt8? {
      guard let modrm = next() else { return nil }
      let mod = modrm >> 6
      let rm = modrm & 7
      if mod == 3 { return mustBeMemory ? nil : (modrm >> 3) & 7 }
      var displacement = mod == 1 ? 1 : mod == 2 ? 4 : 0
      if rm == 4 {
        guard let sib = next() else { return nil }
        if mod == 0 && sib & 7 == 5 { displacement = 4 }
      } else if mod == 0 && rm == 5 {
        // rip-relative (eip-relative with an address-size prefix: not something to move)
        guard !addressSize32 else { return nil }
        displacement = 4
        ripDisplacement = index
      }
      guard skip(displacement) else { return nil }
      return (modrm >> 3) & 7
    }

    @inline(__always) mutating func skip(_ count: Int) -> Bool {
      guard index + count <= limit else { return false }
      index += count
      return true
    }

    /// A 16- or 32-bit immediate by the operand size (`Iz`).
    var wordImmediate: Int { operandSize16 ? 2 : 4 }

    mutating func relative(_ size: Int) -> Int64? {
      guard index + size <= bytes.count else { return nil }
      let value: Int64
      if size == 1 {
        value = Int64(Int8(bitPattern: bytes[index]))
      } else {
        var word: UInt32 = 0
        for offset in 0..<4 { word |= UInt32(bytes[index + offset]) << (8 * offset) }
        value = Int64(Int32(bitPattern: word))
      }
      index += size
      return value
    }

    mutating func instruction(at address: UInt64) -> Instruction? {
      // Legacy prefixes, then at most one REX right before the opcode.
      var opcode: UInt8
      prefixes: while true {
        guard let byte = next() else { return nil }
        switch byte {
        case 0x66: operandSize16 = true
        case 0x67: addressSize32 = true
        case 0xf2, 0xf3: repeatPrefix = byte
        case 0xf0, 0x2e, 0x3e, 0x26, 0x36, 0x64, 0x65: break
        default:
          opcode = byte
          break prefixes
        }
      }
      if opcode & 0xf0 == 0x40 {
        rexSeen = true
        rexW = opcode & 8 != 0
        guard let byte = next() else { return nil }
        opcode = byte
      }
      @inline(__always) func done(_ flow: Flow = .next) -> Instruction { finished(flow) }
      func target(_ displacement: Int64) -> UInt64 { address &+ UInt64(index) &+ UInt64(bitPattern: displacement) }

      if opcode == 0x0f { return twoByte(at: address) }
      switch opcode {
      case 0x00...0x3f:
        // The eight ALU groups: r/m forms, then AL/eAX with an immediate. The other columns
        // are prefixes (taken above) or invalid in 64-bit mode.
        switch opcode & 7 {
        case 0...3: return modRM() == nil ? nil : done()
        case 4: return skip(1) ? done() : nil
        case 5: return skip(wordImmediate) ? done() : nil
        default: return nil
        }
      case 0x50...0x5f, 0x90...0x99, 0x9c...0x9f, 0xa4...0xa7, 0xaa...0xaf, 0xc9, 0xd7, 0xf5, 0xf8, 0xf9, 0xfc, 0xfd:
        return done()
      case 0x63, 0x84...0x8b, 0x8c, 0xd0...0xd3:
        return modRM() == nil ? nil : done()
      case 0x8d:
        return modRM(mustBeMemory: true) == nil ? nil : done()
      case 0x8f:
        // pop r/m; another reg field is AMD's XOP prefix (vector instructions).
        return modRM() == 0 ? done() : nil
      case 0x68: return skip(wordImmediate) ? done() : nil
      case 0x6a, 0xa8, 0xb0...0xb7: return skip(1) ? done() : nil
      case 0x69: return modRM() != nil && skip(wordImmediate) ? done() : nil
      case 0x6b, 0x80, 0x83, 0xc0, 0xc1: return modRM() != nil && skip(1) ? done() : nil
      case 0x81: return modRM() != nil && skip(wordImmediate) ? done() : nil
      case 0xa9: return skip(wordImmediate) ? done() : nil
      case 0xa0...0xa3: return skip(addressSize32 ? 4 : 8) ? done() : nil
      case 0xb8...0xbf: return skip(rexW ? 8 : wordImmediate) ? done() : nil
      case 0xc6: return modRM() == 0 && skip(1) ? done() : nil
      case 0xc7: return modRM() == 0 && skip(wordImmediate) ? done() : nil
      case 0xc8: return skip(3) ? done() : nil
      case 0xc2: return skip(2) ? done(.end) : nil
      case 0xc3, 0xcc, 0xf4: return done(.end)
      case 0x70...0x7f, 0xe0...0xe3:
        guard let displacement = relative(1) else { return nil }
        if opcode < 0x80 { condition = opcode & 0xf }
        return done(.branch(target(displacement)))
      case 0xeb:
        guard let displacement = relative(1) else { return nil }
        return done(.jump(target(displacement)))
      case 0xe8, 0xe9:
        guard !operandSize16, let displacement = relative(4) else { return nil }
        return done(opcode == 0xe8 ? .call(target(displacement)) : .jump(target(displacement)))
      case 0xf6, 0xf7:
        // test r/m, imm (reg 0 or 1); not, neg, mul, imul, div, idiv (2-7) have no immediate.
        guard let reg = modRM() else { return nil }
        if reg <= 1 { return skip(opcode == 0xf6 ? 1 : wordImmediate) ? done() : nil }
        return done()
      case 0xfe:
        guard let reg = modRM(), reg <= 1 else { return nil }
        return done()
      case 0xff:
        // inc, dec, push r/m; indirect calls and jumps (2-5) lead where this decoder cannot see.
        guard let reg = modRM(), reg != 7 else { return nil }
        return done(reg >= 2 && reg <= 5 ? .indirect : .next)
      case 0xd8...0xdf:
        // x87: a ModRM operand, no immediate.
        return modRM() == nil ? nil : done()
      case 0xc4, 0xc5:
        // VEX (in 64-bit mode these are never LES/LDS); a REX before it is invalid.
        guard !rexSeen else { return nil }
        var map: UInt8 = 1
        if opcode == 0xc4 {
          guard let payload = next() else { return nil }
          map = payload & 0x1f
        }
        guard next() != nil, let vectorOpcode = next() else { return nil }
        return vector(map: map, opcode: vectorOpcode)
      case 0x62:
        // EVEX (BOUND is invalid in 64-bit mode): three payload bytes, the map in the first.
        guard !rexSeen, let first = next(), let second = next(), second & 0x04 != 0, next() != nil,
          let vectorOpcode = next()
        else { return nil }
        return vector(map: first & 0x07, opcode: vectorOpcode)
      default:
        return nil
      }
    }

    /// Opcodes of the 0F map that take an 8-bit immediate after their ModRM operand (pshufd and
    /// the shifts by an immediate, cmpps, pinsrw, pextrw, shufps), in every encoding.
    static func immediateInMap1(_ opcode: UInt8) -> Bool {
      switch opcode {
      case 0x70...0x73, 0xc2, 0xc4...0xc6: true
      default: false
      }
    }

    /// A VEX- or EVEX-encoded instruction's rest, after its opcode: a ModRM operand (but
    /// vzeroupper/vzeroall), and an 8-bit immediate in the 0F3A map and for `immediateInMap1`.
    mutating func vector(map: UInt8, opcode: UInt8) -> Instruction? {
      switch map {
      case 1:
        if opcode == 0x77 { return finished(.next) }
        guard modRM() != nil else { return nil }
        return !Self.immediateInMap1(opcode) || skip(1) ? finished(.next) : nil
      case 2, 5, 6:
        return modRM() == nil ? nil : finished(.next)
      case 3:
        return modRM() != nil && skip(1) ? finished(.next) : nil
      default:
        return nil
      }
    }

    @inline(__always) func finished(_ flow: Flow) -> Instruction {
      Instruction(
        length: index, flow: flow, ripDisplacementOffset: ripDisplacement, condition: condition,
        isSystemCall: systemCall)
    }

    mutating func twoByte(at address: UInt64) -> Instruction? {
      guard let opcode = next() else { return nil }
      @inline(__always) func done(_ flow: Flow = .next) -> Instruction { finished(flow) }
      switch opcode {
      case 0x05:
        systemCall = true
        return done()
      case 0x31, 0xa2, 0xc8...0xcf:
        return done()
      case 0x01:
        // Group 7: xgetbv, rdtscp, rdpkru/wrpkru, ... (and descriptor-table forms): a ModRM
        // operand, no immediate. Known by length: none of them branches.
        return modRM() == nil ? nil : done()
      case 0x0b:
        return done(.end)
      case 0x0d, 0x18...0x1f, 0x40...0x4f, 0x90...0x9f, 0xa3, 0xa5, 0xab, 0xad, 0xaf, 0xb0, 0xb1, 0xb3, 0xb6, 0xb7,
        0xbb, 0xbc, 0xbd, 0xbe, 0xbf, 0xc0, 0xc1:
        return modRM() == nil ? nil : done()
      case 0xa4, 0xac:
        return modRM() != nil && skip(1) ? done() : nil
      case 0xba:
        guard let reg = modRM(), reg >= 4 else { return nil }
        return skip(1) ? done() : nil
      case 0xb8:
        // popcnt; without F3 this is not a user-mode instruction.
        return repeatPrefix == 0xf3 && modRM() != nil ? done() : nil
      case 0xae:
        // The fences (register forms 5-7), and fxsave, ldmxcsr, clflush and the like.
        guard let modrm = peek(), modrm >> 6 != 3 || (modrm >> 3) & 7 >= 5 else { return nil }
        return modRM() == nil ? nil : done()
      case 0x10...0x17, 0x28...0x2f, 0x50...0x6f, 0x74...0x76, 0x7c...0x7f, 0xc3, 0xc7, 0xd0...0xfe:
        // SSE and MMX (and movnti, cmpxchg8b/16b, rdrand): a ModRM operand, no immediate.
        return modRM() == nil ? nil : done()
      case 0x70...0x73, 0xc2, 0xc4...0xc6:
        return modRM() != nil && skip(1) ? done() : nil
      case 0x77:
        return done()  // emms
      case 0x38:
        // The 0F38 map: a ModRM operand, no immediate.
        guard next() != nil else { return nil }
        return modRM() == nil ? nil : done()
      case 0x3a:
        // The 0F3A map: a ModRM operand and an 8-bit immediate.
        guard next() != nil else { return nil }
        return modRM() != nil && skip(1) ? done() : nil
      case 0x80...0x8f:
        guard let displacement = relative(4) else { return nil }
        condition = opcode & 0xf
        return done(.branch(address &+ UInt64(index) &+ UInt64(bitPattern: displacement)))
      default:
        return nil
      }
    }
  }
}
