extension Tracer {
  /// A graph user leaving functions that nothing else traces (`record -p`'s detach of 50,000):
  /// each site back to its original bytes in one batch, without the general commit's phases,
  /// which copy every function's state several times (here: once). nil when the general path
  /// is needed: the user is gone already, another graph user traces any function, or one of
  /// this user's functions has handlers of another kind.
  func detachOnlyGraphUser(_ user: Int, state: inout State, callerStack: UInt64) -> TransactionReport? {
    let bit: UInt16 = 1 << user
    guard state.graphUsers[user] != nil else { return nil }
    var requests: [PatchRequest] = []
    var leaving: [(site: UInt64, name: String, function: UInt64, stub: CodeImage?, copy: CodeImage?)] = []
    requests.reserveCapacity(state.functions.count)
    leaving.reserveCapacity(state.functions.count)
    for (site, function) in state.functions where function.graphMask != 0 {
      guard function.graphMask == bit, !function.hasOtherHandlers else { return nil }
      let request: PatchRequest
      if function.patch.shape == .trap {
        // A trap site's request depends on its pad (`patchRequest`).
        var untraced = function
        untraced.graphMask = 0
        untraced.graphStub = nil
        untraced.graphImage = nil
        guard let made = patchRequest(from: siteBytes(function), for: untraced) else { return nil }
        request = made
      } else {
        request = PatchRequest(
          site: site, expected: siteBytes(function), replacement: function.original, resume: function.patch.resume)
      }
      requests.append(request)
      leaving.append((site, function.name, function.function, function.graphStub, function.relocatedCopy))
    }
    state.graphUsers[user] = nil
    // Calls in flight keep their frames but are no longer given to this user's exit.
    GraphThreads.advanceGeneration(user)
    let outcomes = patcher.apply(requests, callerStack: callerStack)
    var gone = 0
    for (function, outcome) in zip(leaving, outcomes) {
      // A site that could not be put back keeps its stub (and its state, as the general path does).
      guard case .patched = outcome else { continue }
      gone += 1
      if let stub = function.stub { state.reclaimer.retire(stub) }
      if let copy = function.copy { state.reclaimer.retire(copy) }
    }
    if gone == state.functions.count {
      state.functions.removeAll(keepingCapacity: true)
    } else {
      for (function, outcome) in zip(leaving, outcomes) where outcome == .patched {
        state.functions[function.site] = nil
      }
    }
    // No site calls a graph image now, unless one that could not be put back does.
    retireGraphImages([], state: &state)
    restorePaddingNops(state: &state, callerStack: callerStack)
    if state.reclaimer.isDue(now: System.monotonicNanoseconds()) {
      _ = state.reclaimer.reclaim(arena: arena, callerStack: callerStack)
    }
    var report = TransactionReport()
    report.append(
      TransactionReport.Batch(names: leaving.map(\.name), addresses: leaving.map(\.function), outcomes: outcomes))
    return report
  }
}
