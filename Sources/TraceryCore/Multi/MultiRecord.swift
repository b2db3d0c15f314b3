/// The record of one function on a global multi-attach trampoline: written here, read by the
/// code `MultiEmitter` generates, at the offsets below.
///
///     word 0   the shape: the kind (`HandlerKind` raw value) of its only handler, 0 when it has
///              more than one (the emitter's paths without loops)
///     word 1   number of entry handlers
///     word 2   number of modify-return handlers
///     word 3   number of exit handlers
///     then     (handler, cookie) pairs: the entry handlers', the modify-return handlers', the exits'
///
/// Protocol: a record is written whole before it is published (a hash table's pair or a
/// function's padding pointer) and never changed while published; a change writes a new record
/// and retires the old one.
enum MultiRecord {
  static let headerWords = 4
  /// Byte offset of word 0 (the shape).
  static let shapeOffset: Int32 = 0
  /// Byte offset of the first (handler, cookie) pair.
  static let pairsOffset: Int32 = 8 * Int32(headerWords)

  /// Byte offset of the count of `kind`'s handlers.
  static func countOffset(_ kind: HandlerKind) -> Int32 {
    switch kind {
    case .entry: return 8
    case .modifyReturn: return 16
    case .exit: return 24
    }
  }

  /// Words of a record of `handlers` handlers.
  static func words(handlers: Int) -> Int { headerWords + 2 * handlers }

  /// Writes the record of one handler at `words` (a bulk link's, 50,000 times in an attach: no
  /// array).
  static func write(_ words: UnsafeMutablePointer<UInt64>, kind: HandlerKind, handler: UInt64, cookie: UInt64) {
    // The general `write`'s record, written directly (its loop over the kinds, through the
    // lazily made `HandlerKind.order`, was most of writing 50,000 records).
    words[Int(shapeOffset) / 8] = UInt64(kind.rawValue)
    words[Int(countOffset(.entry)) / 8] = kind == .entry ? 1 : 0
    words[Int(countOffset(.modifyReturn)) / 8] = kind == .modifyReturn ? 1 : 0
    words[Int(countOffset(.exit)) / 8] = kind == .exit ? 1 : 0
    words[headerWords] = handler
    words[headerWords + 1] = cookie
  }

  /// Writes the record of `handlers` (any order: grouped by kind here) at `words`; returns its
  /// size in words.
  @discardableResult
  static func write(
    _ words: UnsafeMutablePointer<UInt64>,
    handlers: some Collection<(kind: HandlerKind, handler: UInt64, cookie: UInt64)>
  ) -> Int {
    words[Int(shapeOffset) / 8] = handlers.count == 1 ? UInt64(handlers.first!.kind.rawValue) : 0
    var at = headerWords
    for kind in HandlerKind.order {
      var count: UInt64 = 0
      for item in handlers where item.kind == kind {
        words[at] = item.handler
        words[at + 1] = item.cookie
        at += 2
        count += 1
      }
      words[Int(countOffset(kind)) / 8] = count
    }
    return at
  }
}
