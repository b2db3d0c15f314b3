import CTracery
import Synchronization

/// A handler written in C or Swift (`@convention(c)`), as `tracery.h` declares them.
public typealias EntryHandler = @convention(c) (UnsafeMutablePointer<tracery_call>, UInt64) -> Void
public typealias ExitHandler = @convention(c) (UnsafeMutablePointer<tracery_call>, UInt64) -> Void
/// Returns non-zero to skip the function's body; it then returns `call.pointee.return_value`.
public typealias ModifyReturnHandler = @convention(c) (UnsafeMutablePointer<tracery_call>, UInt64) -> Int32

/// A handler's kind, numbered as `tracery.h` numbers it (`tracery_handler_kind`) for C handlers,
/// fixtures and the recorder's events alike. A trampoline runs entry handlers, then
/// modify-return handlers, then the body, then exit handlers (`order`).
public enum HandlerKind: UInt8, Sendable, CaseIterable {
  case entry = 1
  case exit = 2
  case modifyReturn = 3

  /// The kinds in the order a trampoline runs them (and multi records list them).
  public static let order: [HandlerKind] = [.entry, .modifyReturn, .exit]
}

/// What to run on each call of the traced functions.
public enum Handler: Sendable {
  /// Before the body; may read and change the arguments.
  case entry(EntryHandler)
  /// After the body; reads the arguments and the return value.
  case exit(ExitHandler)
  /// Before the body, after entry handlers (the kernel's fmod_ret): may set the return value
  /// and skip the body. Runs before exit handlers.
  case modifyReturn(ModifyReturnHandler)

  public var kind: HandlerKind {
    switch self {
    case .entry: return .entry
    case .modifyReturn: return .modifyReturn
    case .exit: return .exit
    }
  }

  var address: UInt64 {
    switch self {
    case .entry(let handler): return UInt64(UInt(bitPattern: unsafeBitCast(handler, to: UnsafeRawPointer.self)))
    case .exit(let handler): return UInt64(UInt(bitPattern: unsafeBitCast(handler, to: UnsafeRawPointer.self)))
    case .modifyReturn(let handler):
      return UInt64(UInt(bitPattern: unsafeBitCast(handler, to: UnsafeRawPointer.self)))
    }
  }
}

/// Which functions to attach to.
public enum FunctionSelector: Sendable, Equatable {
  /// The function that starts at this address (its entry, or its patch site).
  case address(UInt64)
  /// Every function of the loaded objects with exactly this name.
  case name(String)
  /// Every function of the loaded objects whose name matches this glob.
  case glob(String)
  /// The functions at these addresses (entries or patch sites); unusable ones are reported.
  case addresses([UInt64])
}

/// Why an attach or detach could not be done.
public enum AttachError: Error, Equatable, CustomStringConvertible {
  case noFunctionMatches(String)
  case invalidPattern(String)
  /// The function has no patch site Tracery can use (with why: its bytes, or gcc's sled).
  case noPatchSite(function: String, reason: String)
  /// The handler kind cannot be attached under this function model.
  case unsupportedModel(function: String, reason: String)
  /// Every selected function failed; the report says why for each.
  case nothingAttached(TransactionReport)
  case codeMemory(String)
  /// 4,096 fprobes are registered.
  case fprobesExhausted
  /// All 16 function-graph user slots are taken (or a second recorder was asked for).
  case graphUsersExhausted
  /// The frame's 7 data words cannot hold another user's reservation.
  case graphDataExhausted(requested: Int)

  public var description: String {
    switch self {
    case .noFunctionMatches(let what): return "no patchable function matches \(what)"
    case .invalidPattern(let reason): return reason
    case .noPatchSite(let function, let reason): return "\(function) has no usable patch site: \(reason)"
    case .unsupportedModel(let function, let reason): return "cannot attach to \(function): \(reason)"
    case .nothingAttached(let report): return "nothing attached: \(report)"
    case .codeMemory(let reason): return reason
    case .fprobesExhausted: return "4096 fprobes are registered already"
    case .graphUsersExhausted: return "no function-graph user slot is free (16 users, one recorder)"
    case .graphDataExhausted(let requested):
      return "the function-graph frame has no room for \(requested) more data words (7 in all)"
    }
  }
}

/// What a transaction did to each function it touched.
public struct TransactionReport: Sendable, Equatable, CustomStringConvertible {
  public struct Entry: Sendable, Equatable {
    public let function: String
    public let address: UInt64
    public let outcome: PatchOutcome
  }

  /// Entries of a bulk batch as the parallel arrays it already had (sharing their storage), made
  /// into `Entry` values only when read: reporting 50,000 functions then costs nothing.
  struct Batch: Sendable, Equatable {
    let names: [String]
    let addresses: [UInt64]
    let outcomes: [PatchOutcome]
  }

  private var listed: [Entry] = []
  private var batches: [Batch] = []

  public init() {}

  public var entries: [Entry] {
    get {
      batches.isEmpty
        ? listed
        : listed
          + batches.flatMap { batch in
            batch.names.indices.map {
              Entry(function: batch.names[$0], address: batch.addresses[$0], outcome: batch.outcomes[$0])
            }
          }
    }
    set {
      listed = newValue
      batches = []
    }
  }

  mutating func append(_ entry: Entry) { listed.append(entry) }

  mutating func append(contentsOf other: TransactionReport) {
    listed += other.listed
    batches += other.batches
  }

  mutating func append(_ batch: Batch) { batches.append(batch) }

  /// The addresses of the entries whose outcome `matches` (without making the entries).
  func addresses(where matches: (PatchOutcome) -> Bool) -> Set<UInt64> {
    var result = Set(listed.filter { matches($0.outcome) }.map(\.address))
    for batch in batches {
      for index in batch.outcomes.indices where matches(batch.outcomes[index]) { result.insert(batch.addresses[index]) }
    }
    return result
  }

  public var failures: [Entry] { entries.filter { if case .failed = $0.outcome { true } else { false } } }

  public static func == (left: TransactionReport, right: TransactionReport) -> Bool { left.entries == right.entries }

  public var description: String {
    entries.map { "\($0.function): \($0.outcome)" }.joined(separator: "; ")
  }
}

/// One attachment of a handler to a set of functions. Keep it to keep the handler attached;
/// `detach()` removes it from every function in one batch.
public final class Link: Sendable {
  let id: Int
  let tracer: Tracer
  let counters: AttachmentCounters
  public let cookie: UInt64

  init(id: Int, tracer: Tracer, cookie: UInt64) {
    self.id = id
    self.tracer = tracer
    self.cookie = cookie
    counters = AttachmentCounters()
  }

  /// Entry addresses of the functions this link is attached to now.
  public var functions: [UInt64] { tracer.functions(of: self) }
  /// Calls that ran the handler (counted with `statistics: .calls` or `.callsAndTime`).
  public var calls: UInt64 { counters.calls }
  /// Time spent inside the handler (measured with `statistics: .callsAndTime`), from the
  /// time-stamp counter.
  public var handlerTime: Duration { .nanoseconds(Int64(Double(counters.ticks) / TimeStampCounter.ticksPerNanosecond)) }
  /// Calls on which the handler did not run because this thread was already inside a handler.
  public var skippedByRecursionGuard: UInt64 { counters.skipped }

  /// Detaches the handler from every function; the trampolines it leaves are freed once no
  /// thread is inside them. Detaching twice does nothing.
  @discardableResult
  public func detach() -> TransactionReport {
    tracer.commit([.detach(id)])
  }
}
