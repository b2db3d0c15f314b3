import TraceryX86

/// The 24 bytes a function with multi-attach exit or modify-return handlers on a global
/// trampoline goes through (its site `jmp`s here), so that its calls and returns pair up:
///
///     +0   call TRAMPOLINE      the global trampoline (`MultiEmitter.viaStub`): [rsp] = stub + 5
///     +5   ret                  back to the function's caller, after the trampoline returned here
///     +6   jmp RESUME           the function's body (`PatchSite.resume`): the trampoline calls
///                               or jumps to stub + 6, i.e. [rsp] + 1
///     +11  int3
///     +12  SITE - (stub + 5)    the function's patch site as a 32-bit offset from [rsp]: the
///                               trampoline's key for the function's record
///     +16  RECORD               8 bytes: the function's record (`MultiRecord`) for a hash-mode
///                               trampoline, which then needs no lookup; 0: look it up by site
///
/// The code and the site are written whole before the site jumps here and never changed. The
/// record word is the one field that changes (`Tracer.publishMultiTable`, bulk links at attach
/// and detach), by one aligned 8-byte store, as padding record pointers are: it always holds 0
/// or a record no retired block holds, so that a thread reading it late (already inside the
/// stub) never reaches freed memory; a reader holds what it read in r11, then in the trampoline's
/// hazard slot, as with padding. Retired (freed once no thread can be inside, i.e. hold stub + 5
/// as a return address) when the site leaves it.
enum MultiStub {
  static let size = 24
  static let returnOffset: Int32 = 5
  static let bodyOffset: Int32 = 6
  static let siteOffset: Int32 = 12
  static let recordOffset: Int32 = 16

  /// The stub at `address` for `patch`, calling `trampoline`; nil when one of them is out of
  /// rel32 reach.
  static func bytes(at address: UInt64, patch: PatchSite, trampoline: UInt64) -> [UInt8]? {
    guard let call = X86Instruction.call(at: address, to: trampoline),
      let body = X86Instruction.jmp(at: address + UInt64(bodyOffset), to: patch.resume),
      let site = Int32(exactly: Int64(bitPattern: patch.address &- (address + UInt64(returnOffset))))
    else { return nil }
    return call + [0xc3] + body + [0xcc] + withUnsafeBytes(of: site.littleEndian) { Array($0) }
      + [UInt8](repeating: 0, count: 8)
  }

  /// The trampoline the stub at `address` calls.
  static func trampoline(of address: UInt64) -> UInt64 { target(at: address + 1, after: address + 5) }

  /// The patch site the stub at `address` serves.
  static func site(of address: UInt64) -> UInt64 {
    target(at: address + UInt64(siteOffset), after: address + UInt64(returnOffset))
  }

  private static func target(at field: UInt64, after base: UInt64) -> UInt64 {
    let displacement = UnsafePointer<Int32>(bitPattern: UInt(field))!.pointee
    return UInt64(bitPattern: Int64(bitPattern: base) + Int64(displacement))
  }
}

/// The block a relocated function's site jumps to when an entry-only bulk link traces it (a
/// function built without a patch site: its first instructions are moved here, and gcc's
/// callers may keep values in any call-clobbered register across its call, `-fipa-ra`):
///
///     +0   FUNCTION             8 bytes: the function's entry (the handlers' `function`)
///     +8   SITE                 8 bytes: its patch site (after an `endbr64`), the record's key
///     +16  call TRAMPOLINE      the site's `jmp` lands here; the global trampoline keeping
///                               every register (`MultiEmitter.keepsEveryRegister`): [rsp] =
///                               stub + 21
///     +21  the function's first instructions, relocated, and a `jmp` back after them: the
///          trampoline returns here (its `ret` pairs with the stub's `call`; the body's `ret`
///          with the caller's call)
///
/// Written whole before the site jumps here; never changed; retired with its link's block.
enum PrologueStub {
  static let functionOffset = 0
  static let siteOffset = 8
  static let entryOffset = 16
  static let copyOffset = 21
  /// Stubs start at multiples of this (the words aligned).
  static let alignment = 8
  /// The most bytes one stub takes: the words, the call, and the longest copy
  /// (`Tracer.relocatedCopy`'s block).
  static let maximumSize = copyOffset + 128

  /// Writes the stub for the relocated site `site` of the function at `function` (its first
  /// `length` bytes move; `verbatim`: unchanged, `PatchSite.movesVerbatim`), calling
  /// `trampoline`, at `code`'s next byte (`maximumSize` bytes of room); false (and nothing
  /// written) when the copy cannot be made there or a branch is out of reach.
  static func write(
    to code: inout CodeArena.Block.Writer, function: UInt64, site: UInt64, length: UInt8, verbatim: Bool,
    trampoline: UInt64
  ) -> Bool {
    let start = code.count
    let copy = code.address + UInt64(copyOffset)
    // The same instructions as when the site was chosen: those covering its length (the
    // patcher relocates them again with the same bytes to move threads into the copy).
    let moving = UnsafeRawBufferPointer(start: UnsafeRawPointer(bitPattern: UInt(site)), count: Int(length) + 15)
    guard let call = X86Writer.rel32(from: copy, to: trampoline) else { return false }
    // The words and the call in one piece (puts of a few bytes each were most of writing
    // 50,000 stubs).
    code.write(count: copyOffset) { stub in
      stub.storeBytes(of: function.littleEndian, toByteOffset: functionOffset, as: UInt64.self)
      stub.storeBytes(of: site.littleEndian, toByteOffset: siteOffset, as: UInt64.self)
      stub.storeBytes(of: 0xe8, toByteOffset: entryOffset, as: UInt8.self)
      stub.storeBytes(of: call.littleEndian, toByteOffset: entryOffset + 1, as: Int32.self)
    }
    if verbatim {
      if X86Relocator.putVerbatim(moving, at: site, length: Int(length), to: copy, into: &code) { return true }
      code.count = start
      return false
    }
    do {
      var bytes: [UInt8] = []
      let moved = try X86Relocator.relocate(moving, at: site, to: copy, minimum: Int(length), appendingTo: &bytes)
      if moved.length == Int(length) {
        code.put(bytes)
        return true
      }
    } catch {}
    code.count = start
    return false
  }
}
