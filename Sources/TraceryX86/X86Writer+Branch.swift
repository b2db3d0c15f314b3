extension X86Writer {
  /// `call rel32` to an absolute address. Throws if the target is out of rel32 reach of `pc`.
  public mutating func putCall(address: UInt64) throws(WriteError) {
    let from = pc &+ 5
    guard let rel = X86Writer.rel32(from: from, to: address) else { throw .outOfRange(from: from, to: address) }
    emit(0xe8)
    emit32(rel)
  }

  /// `call rel32` to `address` when it is in reach, else `mov scratch, address; call scratch`.
  public mutating func putCall(address: UInt64, orThrough scratch: Register) {
    if let rel = X86Writer.rel32(from: pc &+ 5, to: address) {
      emit(0xe8)
      emit32(rel)
    } else {
      putMov(scratch, immediate: address)
      putCall(scratch)
    }
  }

  /// `jmp rel32` to an absolute address. Throws if the target is out of rel32 reach of `pc`.
  public mutating func putJmp(address: UInt64) throws(WriteError) {
    let from = pc &+ 5
    guard let rel = X86Writer.rel32(from: from, to: address) else { throw .outOfRange(from: from, to: address) }
    emit(0xe9)
    emit32(rel)
  }

  /// `call rel32` to a label.
  public mutating func putCall(_ label: Label) {
    emit(0xe8)
    fixups.append(.rel32(offset: bytes.count, end: bytes.count + 4, label: label))
    emit32(0)
  }

  /// `jmp rel32` to a label, or `jmp rel8` when `short` (checked in `finish()`).
  public mutating func putJmp(_ label: Label, short: Bool = false) {
    if short {
      emit(0xeb)
      fixups.append(.rel8(offset: bytes.count, end: bytes.count + 1, label: label))
      emit(0)
    } else {
      emit(0xe9)
      fixups.append(.rel32(offset: bytes.count, end: bytes.count + 4, label: label))
      emit32(0)
    }
  }

  /// `jcc rel32` to a label, or `jcc rel8` when `short`.
  public mutating func putJcc(_ condition: Condition, _ label: Label, short: Bool = false) {
    if short {
      emit(0x70 + condition.rawValue)
      fixups.append(.rel8(offset: bytes.count, end: bytes.count + 1, label: label))
      emit(0)
    } else {
      emit([0x0f, 0x80 + condition.rawValue])
      fixups.append(.rel32(offset: bytes.count, end: bytes.count + 4, label: label))
      emit32(0)
    }
  }

  /// `call reg`.
  public mutating func putCall(_ register: Register) {
    rex(w: false, b: register.extended)
    emit(0xff)
    emit(0xd0 | register.low)
  }

  /// `jmp reg`.
  public mutating func putJmp(_ register: Register) {
    rex(w: false, b: register.extended)
    emit(0xff)
    emit(0xe0 | register.low)
  }

  /// `call qword [memory]`.
  public mutating func putCall(_ memory: Memory) { putMemoryForm(0xff, reg: 2, memory: memory, wide: false) }

  /// `jmp qword [memory]`.
  public mutating func putJmp(_ memory: Memory) { putMemoryForm(0xff, reg: 4, memory: memory, wide: false) }

  /// `ret`.
  public mutating func putRet() { emit(0xc3) }

  /// `ret imm16`: return and pop `bytes` more.
  public mutating func putRet(popping count: UInt16) {
    emit(0xc2)
    bytes.appendLE(count)
  }

  /// `int3`.
  public mutating func putInt3() { emit(0xcc) }

  /// `ud2`.
  public mutating func putUd2() { emit([0x0f, 0x0b]) }

  /// `endbr64`.
  public mutating func putEndbr64() { emit([0xf3, 0x0f, 0x1e, 0xfa]) }

  /// `leave`.
  public mutating func putLeave() { emit(0xc9) }

  /// Instructions another writer encoded, that name no label and no address (they mean the same
  /// wherever they land): a run a caller emits often, encoded once.
  public mutating func putEncoded(_ instructions: [UInt8]) { emit(instructions) }

  /// `count` bytes of NOPs, in the fewest recommended multi-byte NOP instructions.
  public mutating func putNop(count: Int) {
    var left = count
    while left > 0 {
      let size = min(left, 9)
      emit(X86Instruction.nops[size])
      left -= size
    }
  }
}
