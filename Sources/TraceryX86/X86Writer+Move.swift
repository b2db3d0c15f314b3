extension X86Writer {
  /// `push reg`.
  public mutating func putPush(_ register: Register) {
    rex(w: false, b: register.extended)
    emit(0x50 + register.low)
  }

  /// `pop reg`.
  public mutating func putPop(_ register: Register) {
    rex(w: false, b: register.extended)
    emit(0x58 + register.low)
  }

  /// `push imm32` (sign-extended to 64 bits).
  public mutating func putPush(immediate: Int32) {
    emit(0x68)
    emit32(immediate)
  }

  /// `pushfq`.
  public mutating func putPushfq() { emit(0x9c) }

  /// `popfq`.
  public mutating func putPopfq() { emit(0x9d) }

  /// `mov dst, src` (64-bit).
  public mutating func putMov(_ destination: Register, _ source: Register) {
    rex(w: true, r: source.extended, b: destination.extended)
    emit(0x89)
    emit(0xc0 | source.low << 3 | destination.low)
  }

  /// `mov reg, imm` in its shortest form: `mov r32, imm32` (zero-extends), `mov r64, simm32`, or
  /// `movabs r64, imm64`.
  public mutating func putMov(_ destination: Register, immediate: UInt64) {
    if immediate <= UInt64(UInt32.max) {
      rex(w: false, b: destination.extended)
      emit(0xb8 + destination.low)
      bytes.appendLE(UInt32(immediate))
    } else if let signed = Int32(exactly: Int64(bitPattern: immediate)) {
      rex(w: true, b: destination.extended)
      emit(0xc7)
      emit(0xc0 | destination.low)
      emit32(signed)
    } else {
      putMovabs(destination, immediate: immediate)
    }
  }

  /// `movabs reg, imm64` (always 10 bytes: for values patched later).
  public mutating func putMovabs(_ destination: Register, immediate: UInt64) {
    rex(w: true, b: destination.extended)
    emit(0xb8 + destination.low)
    emit64(immediate)
  }

  /// `mov reg, qword [memory]`.
  public mutating func putMov(_ destination: Register, _ source: Memory) { putMemoryForm(0x8b, destination, source) }

  /// `mov qword [memory], reg`.
  public mutating func putMov(_ destination: Memory, _ source: Register) { putMemoryForm(0x89, source, destination) }

  /// `mov byte [memory], imm8`.
  public mutating func putMovByte(_ destination: Memory, immediate: UInt8) {
    putMemoryForm(0xc6, reg: 0, memory: destination, wide: false, trailing: 1)
    emit(immediate)
  }

  /// `mov qword [memory], simm32`.
  public mutating func putMov(_ destination: Memory, immediate: Int32) {
    putMemoryForm(0xc7, reg: 0, memory: destination, trailing: 4)
    emit32(immediate)
  }

  /// `lea reg, [memory]`.
  public mutating func putLea(_ destination: Register, _ source: Memory) { putMemoryForm(0x8d, destination, source) }

  /// `movaps xmm, [memory]` (memory 16-byte aligned).
  public mutating func putMovaps(_ destination: XMMRegister, _ source: Memory) {
    rex(w: false, r: destination.extended, b: baseExtended(source))
    emit([0x0f, 0x28])
    modRM(reg: destination.number, memory: source)
  }

  /// `movaps [memory], xmm` (memory 16-byte aligned).
  public mutating func putMovaps(_ destination: Memory, _ source: XMMRegister) {
    rex(w: false, r: source.extended, b: baseExtended(destination))
    emit([0x0f, 0x29])
    modRM(reg: source.number, memory: destination)
  }

  /// `xsave64 [memory]`: the processor state components edx:eax selects into a 64-byte aligned
  /// area whose header (bytes 512-575) is zero or a previous `xsave`'s.
  public mutating func putXsave64(_ area: Memory) {
    rex(w: true, b: baseExtended(area))
    emit([0x0f, 0xae])
    modRM(reg: 4, memory: area)
  }

  /// `xrstor64 [memory]`: the components edx:eax selects back from an `xsave64` area.
  public mutating func putXrstor64(_ area: Memory) {
    rex(w: true, b: baseExtended(area))
    emit([0x0f, 0xae])
    modRM(reg: 5, memory: area)
  }

  /// `movdqu xmm, [memory]`.
  public mutating func putMovdqu(_ destination: XMMRegister, _ source: Memory) {
    emit(0xf3)
    rex(w: false, r: destination.extended, b: baseExtended(source))
    emit([0x0f, 0x6f])
    modRM(reg: destination.number, memory: source)
  }

  /// `movdqu [memory], xmm`.
  public mutating func putMovdqu(_ destination: Memory, _ source: XMMRegister) {
    emit(0xf3)
    rex(w: false, r: source.extended, b: baseExtended(destination))
    emit([0x0f, 0x7f])
    modRM(reg: source.number, memory: destination)
  }

  /// `movq xmm, [memory]` (low 8 bytes, upper zeroed).
  public mutating func putMovq(_ destination: XMMRegister, _ source: Memory) {
    emit(0xf3)
    rex(w: false, r: destination.extended, b: baseExtended(source))
    emit([0x0f, 0x7e])
    modRM(reg: destination.number, memory: source)
  }

  /// `movq [memory], xmm` (low 8 bytes).
  public mutating func putMovq(_ destination: Memory, _ source: XMMRegister) {
    emit(0x66)
    rex(w: false, r: source.extended, b: baseExtended(destination))
    emit([0x0f, 0xd6])
    modRM(reg: source.number, memory: destination)
  }

  /// `rep movsq`: copies rcx words from [rsi] to [rdi], forward (the ABI keeps DF clear).
  public mutating func putRepMovsq() { emit([0xf3, 0x48, 0xa5]) }
}
