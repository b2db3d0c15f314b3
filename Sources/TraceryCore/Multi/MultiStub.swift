import TraceryX86

/// The 16 bytes a function with multi-attach exit or modify-return handlers on a global
/// trampoline goes through (its site `jmp`s here), so that its calls and returns pair up:
///
///     +0   call TRAMPOLINE      the global trampoline (`MultiEmitter.viaStub`): [rsp] = stub + 5
///     +5   ret                  back to the function's caller, after the trampoline returned here
///     +6   int3 int3
///     +8   SITE                 the function's patch site (8 bytes): the trampoline reads it at
///                               [rsp] + 3, and calls the body at SITE + 5
///
/// Written whole before the site jumps here; never changed; retired (freed once no thread can be
/// inside, i.e. hold stub + 5 as a return address) when the site leaves it.
enum MultiStub {
  static let size = 16
  static let returnOffset: Int32 = 5
  static let siteOffset: Int32 = 8

  /// The stub's bytes at `address`, calling `trampoline`; nil when it is out of rel32 reach.
  static func bytes(at address: UInt64, site: UInt64, trampoline: UInt64) -> [UInt8]? {
    guard let call = X86Instruction.call(at: address, to: trampoline) else { return nil }
    return call + [0xc3, 0xcc, 0xcc] + (0..<8).map { UInt8(truncatingIfNeeded: site >> (8 * $0)) }
  }

  /// The trampoline the stub at `address` calls.
  static func trampoline(of address: UInt64) -> UInt64 {
    let displacement = UnsafePointer<Int32>(bitPattern: UInt(address + 1))!.pointee
    return UInt64(Int64(bitPattern: address + 5) + Int64(displacement))
  }
}
