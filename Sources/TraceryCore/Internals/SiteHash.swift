/// Open addressing keyed by patch-site address, the one scheme behind every table that
/// handlers and generated code read without a lock: the ops shared caller's site sets, the
/// fprobe site table, and the multi-attach records' hash (whose probe `MultiEmitter` also
/// writes in machine code). A table has 2^bits slots, at least twice its keys so that linear
/// probes stay short; a key's probe starts at `(site * golden) >> (64 - bits)`; 0 marks an
/// empty slot (no site is 0).
enum SiteHash {
  static let golden: UInt64 = 0x9e37_79b9_7f4a_7c15

  /// Slots (as a power of two) for `count` keys.
  static func bits(for count: Int) -> Int {
    var bits = 1
    while (1 << bits) < 2 * max(1, count) { bits += 1 }
    return bits
  }

  static func shift(bits: Int) -> UInt64 { UInt64(64 - bits) }

  @inline(__always)
  static func start(_ site: UInt64, shift: UInt64) -> Int { Int((site &* golden) >> shift) }

  /// Where each of `sites` goes in a table of 2^bits slots, in order, probing linearly.
  static func place(_ sites: some Sequence<UInt64>, bits: Int) -> [(site: UInt64, slot: Int)] {
    var taken = [Bool](repeating: false, count: 1 << bits)
    return sites.map { site in
      var slot = start(site, shift: shift(bits: bits))
      while taken[slot] { slot = (slot + 1) & ((1 << bits) - 1) }
      taken[slot] = true
      return (site, slot)
    }
  }

  /// The slot holding `site` in a table of 2^(64 - shift) slots whose slot i's key is the word
  /// `keys[i * stride]`; nil when it is not there.
  @inline(__always)
  static func find(_ site: UInt64, shift: UInt64, keys: UnsafePointer<UInt64>, stride: Int = 1) -> Int? {
    let mask = Int(UInt64.max >> shift)
    var slot = start(site, shift: shift)
    while true {
      let found = keys[slot &* stride]
      if found == site { return slot }
      if found == 0 { return nil }
      slot = (slot + 1) & mask
    }
  }
}
