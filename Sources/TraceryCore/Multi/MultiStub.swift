import TraceryX86

/// The 16 bytes a function with multi-attach exit or modify-return handlers on a global
/// trampoline goes through (its site `jmp`s here), so that its calls and returns pair up:
///
///     +0   call TRAMPOLINE      the global trampoline (`MultiEmitter.viaStub`): [rsp] = stub + 5
///     +5   ret                  back to the function's caller, after the trampoline returned here
///     +6   jmp RESUME           the function's body (`PatchSite.resume`): the trampoline calls
///                               or jumps to stub + 6, i.e. [rsp] + 1
///     +11  int3
///     +12  SITE - (stub + 5)    the function's patch site as a 32-bit offset from [rsp]: the
///                               trampoline's key for the function's record
///
/// Written whole before the site jumps here; never changed; retired (freed once no thread can be
/// inside, i.e. hold stub + 5 as a return address) when the site leaves it.
enum MultiStub {
  static let size = 16
  static let returnOffset: Int32 = 5
  static let bodyOffset: Int32 = 6
  static let siteOffset: Int32 = 12

  /// The stub at `address` for `patch`, calling `trampoline`; nil when one of them is out of
  /// rel32 reach.
  static func bytes(at address: UInt64, patch: PatchSite, trampoline: UInt64) -> [UInt8]? {
    guard let call = X86Instruction.call(at: address, to: trampoline),
      let body = X86Instruction.jmp(at: address + UInt64(bodyOffset), to: patch.resume),
      let site = Int32(exactly: Int64(bitPattern: patch.address &- (address + UInt64(returnOffset))))
    else { return nil }
    return call + [0xc3] + body + [0xcc] + withUnsafeBytes(of: site.littleEndian) { Array($0) }
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
