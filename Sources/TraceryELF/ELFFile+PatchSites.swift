/// Where a patch-site address was recorded by the compiler.
public enum PatchSiteSource: Sendable, Equatable, Hashable {
  /// `__patchable_function_entries` (`-fpatchable-function-entry=N[,M]`, clang or gcc).
  case patchableFunctionEntries
  /// `__mcount_loc` (gcc `-pg -mfentry -mnop-mcount -mrecord-mcount`).
  case mcountLoc

  public var sectionName: String {
    switch self {
    case .patchableFunctionEntries: return "__patchable_function_entries"
    case .mcountLoc: return "__mcount_loc"
    }
  }
}

extension ELFFile {
  /// One address the compiler recorded as a patch site (link-time address).
  public struct PatchSiteRecord: Sendable, Equatable, Hashable {
    public let address: UInt64
    public let source: PatchSiteSource
  }

  /// Every recorded patch site, sorted by address, without duplicates or null entries.
  ///
  /// Each section is an array of 8-byte absolute addresses. In a PIE or shared object every word
  /// also has an `R_X86_64_RELATIVE` relocation; bfd writes the value in place as well, lld
  /// leaves zero there, so the relocation's addend wins when there is one.
  public func patchSiteRecords() throws(ELFError) -> [PatchSiteRecord] {
    var records: [PatchSiteRecord] = []
    for source in [PatchSiteSource.patchableFunctionEntries, .mcountLoc] {
      for section in sections(named: source.sectionName) where section.hasFileBytes && section.size >= 8 {
        let words = Int(section.size / 8)
        // A section whose addresses would wrap has no relocations that could name them.
        let (end, wraps) = section.address.addingReportingOverflow(UInt64(words * 8))
        let addends =
          wraps
          ? [UInt64?](repeating: nil, count: words) : try relativeAddends(ofWordsIn: section.address..<end)
        for index in 0..<words {
          let value = addends[index] ?? bytes.u64(Int(section.offset) + index * 8)
          if value != 0 { records.append(PatchSiteRecord(address: value, source: source)) }
        }
      }
    }
    records.sort { $0.address < $1.address }
    var unique: [PatchSiteRecord] = []
    unique.reserveCapacity(records.count)
    for record in records where unique.last?.address != record.address { unique.append(record) }
    return unique
  }
}
