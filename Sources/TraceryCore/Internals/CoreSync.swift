import CTraceryShims
import Synchronization

#if canImport(Glibc)
  import Glibc
#endif

/// Makes every thread of the process execute a core-serialising instruction before returning:
/// the user-space form of the kernel's `on_each_cpu(sync_core)` IPI between the steps of a live
/// patch. Uses `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE)`, registered once; where
/// the kernel lacks it, falls back to an `mprotect` of a private page, whose TLB shootdown
/// interrupts every CPU running this process (the return from that interrupt serialises).
enum CoreSync {
  private static let MEMBARRIER_CMD_QUERY: Int32 = 0
  private static let MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE: Int32 = 32
  private static let MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE: Int32 = 64

  enum Method: Sendable { case membarrier, tlbShootdown(page: UInt64) }

  /// Chosen on first use; the registration is process-wide and permanent.
  private static let method: Method = {
    let supported = ctracery_membarrier(MEMBARRIER_CMD_QUERY, 0)
    if supported >= 0, supported & MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE != 0,
      ctracery_membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE, 0) == 0
    {
      return .membarrier
    }
    let page =
      (try? System.mmap(
        at: nil, length: Int(System.pageSize), protection: PROT_READ | PROT_WRITE, flags: MAP_PRIVATE | MAP_ANONYMOUS))
      ?? 0
    return .tlbShootdown(page: page)
  }()

  static var usesMembarrier: Bool {
    if case .membarrier = method { return true }
    return false
  }

  /// Returns once every running thread has serialised; threads not running serialise when they
  /// are next scheduled (the return to user mode is serialising).
  static func syncAllCores() {
    switch method {
    case .membarrier:
      _ = ctracery_membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE, 0)
    case .tlbShootdown(let page):
      guard page != 0 else { return }
      // The page must be touched (present) for the protection change to need a shootdown.
      UnsafeMutablePointer<UInt8>(bitPattern: UInt(page))!.pointee = 1
      try? System.mprotect(page, System.pageSize, PROT_READ)
      try? System.mprotect(page, System.pageSize, PROT_READ | PROT_WRITE)
    }
  }
}
