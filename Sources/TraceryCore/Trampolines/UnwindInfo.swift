#if canImport(Glibc)
  import Glibc
#endif

/// DWARF call-frame information for one generated trampoline, registered with the unwinder
/// (libgcc's `__register_frame`) so that `backtrace()` and C++ exceptions pass through a
/// function whose exit trampoline is on the stack.
///
/// The rows, for a trampoline laid out by `TrampolineEmitter`:
///
///     offset 0:                CFA = rsp + 8, return address at CFA - 8
///     after `push rbp` (1):    CFA = rsp + 16, rbp at CFA - 16
///     after `mov rbp, rsp` (4): CFA = rbp + 16                     (remember this row)
///     after `leave`:           CFA = rsp + 8, rbp restored
///     after the epilogue:      the remembered row again (the out-of-line stubs run in the frame)
///
/// Lifetime: the bytes must stay valid until `deregister()`; a registration is undone only
/// when its trampoline is reclaimed (no thread can be unwinding through it then).
final class UnwindInfo: @unchecked Sendable {
  // @unchecked: immutable after init; registration state changes only under the tracer's lock.
  private let storage: UnsafeMutableRawPointer
  private var registered = false

  private typealias FrameFunction = @convention(c) (UnsafeMutableRawPointer) -> Void
  private static let registerFrame: FrameFunction? = symbol("__register_frame")
  private static let deregisterFrame: FrameFunction? = symbol("__deregister_frame")

  private static func symbol(_ name: String) -> FrameFunction? {
    // RTLD_DEFAULT (a null handle): libgcc_s is loaded by every Swift or C++ program.
    guard let address = dlsym(nil, name) else { return nil }
    return unsafeBitCast(address, to: FrameFunction.self)
  }

  /// Whether the process has an unwinder to register with.
  static var isAvailable: Bool { registerFrame != nil && deregisterFrame != nil }

  init(start: UInt64, length: Int, epilogueStart: Int, epilogueEnd: Int) {
    let bytes = Self.ehFrame(start: start, length: length, epilogueStart: epilogueStart, epilogueEnd: epilogueEnd)
    storage = .allocate(byteCount: bytes.count, alignment: 8)
    bytes.withUnsafeBytes { storage.copyMemory(from: $0.baseAddress!, byteCount: bytes.count) }
  }

  func register() {
    guard !registered, let registerFrame = Self.registerFrame else { return }
    registerFrame(storage)
    registered = true
  }

  func deregister() {
    guard registered, let deregisterFrame = Self.deregisterFrame else { return }
    deregisterFrame(storage)
    registered = false
  }

  deinit {
    deregister()
    storage.deallocate()
  }

  // DWARF call-frame instructions (DWARF 4, §6.4.2).
  private static let DW_CFA_advance_loc: UInt8 = 0x40
  private static let DW_CFA_offset: UInt8 = 0x80
  private static let DW_CFA_restore: UInt8 = 0xc0
  private static let DW_CFA_advance_loc2: UInt8 = 0x03
  private static let DW_CFA_remember_state: UInt8 = 0x0a
  private static let DW_CFA_restore_state: UInt8 = 0x0b
  private static let DW_CFA_def_cfa: UInt8 = 0x0c
  private static let DW_CFA_def_cfa_register: UInt8 = 0x0d
  private static let DW_CFA_def_cfa_offset: UInt8 = 0x0e
  private static let rsp: UInt8 = 7
  private static let rbp: UInt8 = 6
  private static let returnAddress: UInt8 = 16

  /// A CIE, one FDE and the zero terminator, as `__register_frame` reads an .eh_frame section.
  static func ehFrame(start: UInt64, length: Int, epilogueStart: Int, epilogueEnd: Int) -> [UInt8] {
    var cie: [UInt8] = [0, 0, 0, 0]  // CIE id 0
    cie += [1]  // version
    cie += Array("zR".utf8) + [0]
    cie += [1]  // code alignment factor
    cie += [0x78]  // data alignment factor -8 (SLEB128)
    cie += [returnAddress]
    cie += [1, 0x00]  // augmentation data: FDE addresses are DW_EH_PE_absptr (8 bytes)
    cie += [DW_CFA_def_cfa, rsp, 8, DW_CFA_offset | returnAddress, 1]
    pad(&cie)

    var fde: [UInt8] = []
    let ciePointer = UInt32(4 + cie.count + 4)  // from this field back to the CIE's start
    fde.appendLittleEndian(ciePointer)
    fde.appendLittleEndian(start)
    fde.appendLittleEndian(UInt64(length))
    fde += [0]  // no augmentation data
    fde += [DW_CFA_advance_loc | 1, DW_CFA_def_cfa_offset, 16, DW_CFA_offset | rbp, 2]
    fde += [DW_CFA_advance_loc | 3, DW_CFA_def_cfa_register, rbp, DW_CFA_remember_state]
    fde += [DW_CFA_advance_loc2]
    fde.appendLittleEndian(UInt16(epilogueStart + 1 - 4))  // past `leave`
    fde += [DW_CFA_def_cfa, rsp, 8, DW_CFA_restore | rbp]
    fde += [DW_CFA_advance_loc2]
    fde.appendLittleEndian(UInt16(epilogueEnd - (epilogueStart + 1)))
    fde += [DW_CFA_restore_state]
    pad(&fde)

    var result: [UInt8] = []
    result.appendLittleEndian(UInt32(cie.count))
    result += cie
    result.appendLittleEndian(UInt32(fde.count))
    result += fde
    result += [0, 0, 0, 0]
    return result
  }

  /// Pads a record body with DW_CFA_nop so that length field + body is a multiple of 8.
  private static func pad(_ body: inout [UInt8]) {
    while (body.count + 4) % 8 != 0 { body.append(0) }
  }
}

extension Array where Element == UInt8 {
  fileprivate mutating func appendLittleEndian<T: FixedWidthInteger>(_ value: T) {
    Swift.withUnsafeBytes(of: value.littleEndian) { append(contentsOf: $0) }
  }
}
