extension X86Writer {
  /// Group-1 ALU operations with an immediate (`/digit` of opcode 81/83).
  enum ALU: UInt8 {
    case add = 0, or = 1, and = 4, sub = 5, xor = 6, cmp = 7
  }

  mutating func putALU(_ operation: ALU, _ register: Register, immediate: Int32) {
    rex(w: true, b: register.extended)
    if let short = Int8(exactly: immediate) {
      emit(0x83)
      emit(0xc0 | operation.rawValue << 3 | register.low)
      emit(UInt8(bitPattern: short))
    } else {
      emit(0x81)
      emit(0xc0 | operation.rawValue << 3 | register.low)
      emit32(immediate)
    }
  }

  /// `add reg, imm` (64-bit; imm8 form when it fits).
  public mutating func putAdd(_ register: Register, immediate: Int32) { putALU(.add, register, immediate: immediate) }
  /// `sub reg, imm` (64-bit; imm8 form when it fits).
  public mutating func putSub(_ register: Register, immediate: Int32) { putALU(.sub, register, immediate: immediate) }
  /// `and reg, imm` (64-bit; e.g. `and rsp, -16` to align the stack).
  public mutating func putAnd(_ register: Register, immediate: Int32) { putALU(.and, register, immediate: immediate) }
  /// `cmp reg, imm` (64-bit).
  public mutating func putCmp(_ register: Register, immediate: Int32) { putALU(.cmp, register, immediate: immediate) }

  /// `add dst, src` (64-bit).
  public mutating func putAdd(_ destination: Register, _ source: Register) {
    rex(w: true, r: source.extended, b: destination.extended)
    emit(0x01)
    emit(0xc0 | source.low << 3 | destination.low)
  }

  /// `sub dst, src` (64-bit).
  public mutating func putSub(_ destination: Register, _ source: Register) {
    rex(w: true, r: source.extended, b: destination.extended)
    emit(0x29)
    emit(0xc0 | source.low << 3 | destination.low)
  }

  /// `xor r32, r32` — zeroes the whole 64-bit register in the shortest form.
  public mutating func putXor32(_ destination: Register, _ source: Register) {
    rex(w: false, r: source.extended, b: destination.extended)
    emit(0x31)
    emit(0xc0 | source.low << 3 | destination.low)
  }

  /// `test dst, src` (64-bit).
  public mutating func putTest(_ destination: Register, _ source: Register) {
    rex(w: true, r: source.extended, b: destination.extended)
    emit(0x85)
    emit(0xc0 | source.low << 3 | destination.low)
  }

  /// `test reg, simm32` (64-bit).
  public mutating func putTest(_ register: Register, immediate: Int32) {
    rex(w: true, r: false, b: register.extended)
    emit(0xf7)
    emit(0xc0 | register.low)
    emit32(immediate)
  }

  /// `xadd [memory], reg` (64-bit; no `lock`): memory += reg, reg = memory's old value, in one
  /// instruction, so a signal handler on the same thread sees either both or neither.
  public mutating func putXadd(_ memory: Memory, _ register: Register) {
    segmentPrefix(memory)
    rex(w: true, r: register.extended, b: baseExtended(memory))
    emit([0x0f, 0xc1])
    modRM(reg: register.low, memory: memory)
  }

  /// `cmp byte [memory], imm8`.
  public mutating func putCmpByte(_ memory: Memory, immediate: UInt8) {
    putMemoryForm(0x80, reg: 7, memory: memory, wide: false, trailing: 1)
    emit(immediate)
  }

  /// `test eax, eax` (32-bit): the form that checks an `int` result.
  public mutating func putTest32(_ destination: Register, _ source: Register) {
    rex(w: false, r: source.extended, b: destination.extended)
    emit(0x85)
    emit(0xc0 | source.low << 3 | destination.low)
  }

  /// `inc qword [memory]`, with a `lock` prefix when `locked`.
  public mutating func putInc(_ memory: Memory, locked: Bool = false) {
    if locked { emit(0xf0) }
    putMemoryForm(0xff, reg: 0, memory: memory)
  }

  /// `add qword [memory], simm32`, with a `lock` prefix when `locked`.
  public mutating func putAdd(_ memory: Memory, immediate: Int32, locked: Bool = false) {
    if locked { emit(0xf0) }
    putALU(.add, memory, immediate: immediate)
  }
}

extension X86Writer {
  /// `rdtsc`: the time-stamp counter into edx:eax.
  public mutating func putRdtsc() { emit([0x0f, 0x31]) }

  /// `syscall` (clobbers rcx and r11; the result in rax).
  public mutating func putSyscall() { emit([0x0f, 0x05]) }

  /// `shl reg, imm8` (64-bit).
  public mutating func putShl(_ register: Register, immediate: UInt8) {
    rex(w: true, b: register.extended)
    emit(0xc1)
    emit(0xe0 | register.low)
    emit(immediate)
  }

  /// `shr reg, imm8` (64-bit, logical).
  public mutating func putShr(_ register: Register, immediate: UInt8) {
    rex(w: true, b: register.extended)
    emit(0xc1)
    emit(0xe8 | register.low)
    emit(immediate)
  }

  /// `shr reg, cl` (64-bit, logical).
  public mutating func putShrCL(_ register: Register) {
    rex(w: true, b: register.extended)
    emit(0xd3)
    emit(0xe8 | register.low)
  }

  /// `imul dst, src` (64-bit, low half of the product).
  public mutating func putImul(_ destination: Register, _ source: Register) {
    rex(w: true, r: destination.extended, b: source.extended)
    emit([0x0f, 0xaf])
    emit(0xc0 | destination.low << 3 | source.low)
  }

  /// `or dst, src` (64-bit).
  public mutating func putOr(_ destination: Register, _ source: Register) {
    rex(w: true, r: source.extended, b: destination.extended)
    emit(0x09)
    emit(0xc0 | source.low << 3 | destination.low)
  }

  /// `sub reg, qword [memory]`.
  public mutating func putSub(_ destination: Register, _ source: Memory) { putMemoryForm(0x2b, destination, source) }

  /// `add qword [memory], reg`, with a `lock` prefix when `locked`.
  public mutating func putAdd(_ destination: Memory, _ source: Register, locked: Bool = false) {
    if locked { emit(0xf0) }
    putMemoryForm(0x01, source, destination)
  }
}

extension X86Writer {
  /// Group-1 ALU operation on `qword [memory]` with a sign-extended immediate.
  mutating func putALU(_ operation: ALU, _ memory: Memory, immediate: Int32) {
    if let short = Int8(exactly: immediate) {
      putMemoryForm(0x83, reg: operation.rawValue, memory: memory, trailing: 1)
      emit(UInt8(bitPattern: short))
    } else {
      putMemoryForm(0x81, reg: operation.rawValue, memory: memory, trailing: 4)
      emit32(immediate)
    }
  }

  /// `cmp qword [memory], simm32`.
  public mutating func putCmp(_ memory: Memory, immediate: Int32) { putALU(.cmp, memory, immediate: immediate) }
  /// `or qword [memory], simm32`.
  public mutating func putOr(_ memory: Memory, immediate: Int32) { putALU(.or, memory, immediate: immediate) }
  /// `or reg, simm32` (64-bit).
  public mutating func putOr(_ register: Register, immediate: Int32) { putALU(.or, register, immediate: immediate) }

  /// `movsxd reg, dword [memory]`: a signed 32-bit value widened to 64 bits.
  public mutating func putMovsxd(_ register: Register, _ memory: Memory) { putMemoryForm(0x63, register, memory) }

  /// `cmp reg, qword [memory]` (flags of reg − memory).
  public mutating func putCmp(_ register: Register, _ memory: Memory) { putMemoryForm(0x3b, register, memory) }

  /// `add reg, qword [memory]`.
  public mutating func putAdd(_ register: Register, _ memory: Memory) { putMemoryForm(0x03, register, memory) }

  /// `cmp left, right` (64-bit; flags of left − right).
  public mutating func putCmp(_ left: Register, _ right: Register) {
    rex(w: true, r: right.extended, b: left.extended)
    emit(0x39)
    emit(0xc0 | right.low << 3 | left.low)
  }

  /// `and reg, qword [memory]`.
  public mutating func putAnd(_ register: Register, _ memory: Memory) { putMemoryForm(0x23, register, memory) }

  /// `or reg, qword [memory]`.
  public mutating func putOr(_ register: Register, _ memory: Memory) { putMemoryForm(0x0b, register, memory) }

  /// `test qword [memory], simm32`.
  public mutating func putTest(_ memory: Memory, immediate: Int32) {
    putMemoryForm(0xf7, reg: 0, memory: memory, trailing: 4)
    emit32(immediate)
  }
}
