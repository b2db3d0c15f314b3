import TraceryX86

#if canImport(Glibc)
  import Glibc
#endif

/// DWARF call-frame information for the trampolines one commit created (one CIE, one FDE per
/// trampoline), registered with the unwinder (libgcc's `__register_frame`) so that
/// `backtrace()` and C++ exceptions pass through a function whose trampoline is on the stack.
///
/// One registration per commit, not per trampoline: libgcc keeps registrations in a list that
/// deregistration and FDE lookup walk, so 50,000 single registrations made detaching quadratic.
///
/// The table owns its trampolines' code blocks: they go back to the arena only when the table
/// is destroyed, i.e. when every trampoline of the commit has been reclaimed. So no FDE of a
/// live registration ever covers memory that was reused for other code.
///
/// The rows, for the two frame shapes `TrampolineEmitter` lays out:
///
///     frame pointer (exit, modify-return)      stack pointer only (entry)
///     0:        CFA = rsp + 8, RA at CFA - 8   0:             CFA = rsp + 8, RA at CFA - 8
///     1:        CFA = rsp + 16, rbp at CFA-16  after sub rsp: CFA = rsp + size + 8  (remember)
///     4:        CFA = rbp + 16      (remember) after add rsp: CFA = rsp + 8
///     leave+1:  CFA = rsp + 8, rbp restored    after the jmp: the remembered row
///     after ret: the remembered row
///
/// (After the epilogue come out-of-line stubs, which run inside the frame.)
///
/// Lifetime: the bytes must stay valid until `deregister()`; a registration is undone only
/// when its trampoline is reclaimed (no thread can be unwinding through it then).
final class UnwindInfo: @unchecked Sendable {
  // @unchecked: immutable after init; registration state changes only under the tracer's lock.
  private let storage: UnsafeMutableRawPointer
  private var registered = false
  private let arena: CodeArena
  private let blocks: [CodeArena.Block]

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

  /// A trampoline's frame shape, with the code offsets where its rows change.
  enum Frame: Equatable {
    case framePointer(epilogueStart: Int, epilogueEnd: Int)
    case stackPointer(size: Int, prologueEnd: Int, afterRelease: Int, epilogueEnd: Int)
  }

  /// One trampoline: its block, the length of its code, its frame shape.
  struct Entry {
    let block: CodeArena.Block
    let length: Int
    let frame: Frame
  }

  /// The table of `entries`, registered at once. Their blocks return to `arena` on deinit.
  init(_ entries: [Entry], arena: CodeArena) {
    self.arena = arena
    blocks = entries.map(\.block)
    let bytes = Self.ehFrame(entries.map { ($0.block.address, $0.length, $0.frame) })
    storage = .allocate(byteCount: bytes.count, alignment: 8)
    bytes.withUnsafeBytes { storage.copyMemory(from: $0.baseAddress!, byteCount: bytes.count) }
    if let registerFrame = Self.registerFrame {
      registerFrame(storage)
      registered = true
    }
  }

  deinit {
    if registered, let deregisterFrame = Self.deregisterFrame { deregisterFrame(storage) }
    storage.deallocate()
    arena.release(contentsOf: blocks)
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

  /// A CIE, one FDE per trampoline and the zero terminator, as `__register_frame` reads an
  /// .eh_frame section.
  static func ehFrame(_ entries: [(start: UInt64, length: Int, frame: Frame)]) -> [UInt8] {
    var cie: [UInt8] = [0, 0, 0, 0]  // CIE id 0
    cie += [1]  // version
    cie += Array("zR".utf8) + [0]
    cie += [1]  // code alignment factor
    cie += [0x78]  // data alignment factor -8 (SLEB128)
    cie += [returnAddress]
    cie += [1, 0x00]  // augmentation data: FDE addresses are DW_EH_PE_absptr (8 bytes)
    cie += [DW_CFA_def_cfa, rsp, 8, DW_CFA_offset | returnAddress, 1]
    pad(&cie)

    var result: [UInt8] = []
    result.appendLE(UInt32(cie.count))
    result += cie
    for entry in entries {
      let fde = self.fde(
        start: entry.start, length: entry.length, frame: entry.frame, ciePointer: UInt32(result.count + 4))
      result.appendLE(UInt32(fde.count))
      result += fde
    }
    result += [0, 0, 0, 0]
    return result
  }

  /// One FDE body; `ciePointer` is the distance from its CIE-pointer field back to the CIE.
  private static func fde(start: UInt64, length: Int, frame: Frame, ciePointer: UInt32) -> [UInt8] {
    var fde: [UInt8] = []
    fde.appendLE(ciePointer)
    fde.appendLE(start)
    fde.appendLE(UInt64(length))
    fde += [0]  // no augmentation data
    func advance(_ delta: Int) {
      fde += [DW_CFA_advance_loc2]
      fde.appendLE(UInt16(delta))
    }
    switch frame {
    case .framePointer(let epilogueStart, let epilogueEnd):
      fde += [DW_CFA_advance_loc | 1, DW_CFA_def_cfa_offset, 16, DW_CFA_offset | rbp, 2]
      fde += [DW_CFA_advance_loc | 3, DW_CFA_def_cfa_register, rbp, DW_CFA_remember_state]
      advance(epilogueStart + 1 - 4)  // past `leave`
      fde += [DW_CFA_def_cfa, rsp, 8, DW_CFA_restore | rbp]
      advance(epilogueEnd - (epilogueStart + 1))
      fde += [DW_CFA_restore_state]
    case .stackPointer(let size, let prologueEnd, let afterRelease, let epilogueEnd):
      advance(prologueEnd)
      fde += [DW_CFA_def_cfa_offset] + uleb128(size + 8) + [DW_CFA_remember_state]
      advance(afterRelease - prologueEnd)
      fde += [DW_CFA_def_cfa_offset, 8]
      advance(epilogueEnd - afterRelease)
      fde += [DW_CFA_restore_state]
    }
    pad(&fde)
    return fde

  }

  static func uleb128(_ value: Int) -> [UInt8] {
    var value = value
    var bytes: [UInt8] = []
    repeat {
      var byte = UInt8(value & 0x7f)
      value >>= 7
      if value != 0 { byte |= 0x80 }
      bytes.append(byte)
    } while value != 0
    return bytes
  }

  /// Pads a record body with DW_CFA_nop so that length field + body is a multiple of 8.
  private static func pad(_ body: inout [UInt8]) {
    while (body.count + 4) % 8 != 0 { body.append(0) }
  }
}
