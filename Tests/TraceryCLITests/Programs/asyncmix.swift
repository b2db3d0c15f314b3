// Swift concurrency as programs use it: a task group of 20 tasks, an actor, a throwing async
// function, a checked continuation resumed from a detached task, an AsyncStream, `async let`
// recursion and Task.sleep. Prints totals that do not depend on scheduling.
actor Counter {
  var value = 0
  func add(_ n: Int) -> Int { value += n; return value }
}
struct Failure: Error { let code: Int }
@inline(never) func leafWork(_ n: Int) async -> Int {
  var x = n
  for _ in 0..<100 { x = (x &* 31 &+ 7) & 0xffff }
  return x
}
@inline(never) func mayThrow(_ n: Int) async throws -> Int {
  if n % 3 == 0 { throw Failure(code: n) }
  return await leafWork(n)
}
@inline(never) func viaContinuation(_ n: Int) async -> Int {
  await withCheckedContinuation { continuation in
    DispatchLike.run { continuation.resume(returning: n * 2) }
  }
}
enum DispatchLike {
  static func run(_ body: @escaping @Sendable () -> Void) { Task.detached { body() } }
}
@inline(never) func stream(_ n: Int) async -> Int {
  let s = AsyncStream<Int> { c in
    for i in 0..<n { c.yield(i) }
    c.finish()
  }
  var sum = 0
  for await v in s { sum += v }
  return sum
}
@inline(never) func recurse(_ depth: Int) async -> Int {
  if depth == 0 { return await leafWork(1) }
  async let a = recurse(depth - 1)
  let b = await leafWork(depth)
  return await a &+ b
}
@main struct Main {
  static func main() async {
    let counter = Counter()
    var total = 0
    await withTaskGroup(of: Int.self) { group in
      for i in 0..<20 {
        group.addTask {
          var t = 0
          do { t += try await mayThrow(i) } catch let f as Failure { t += f.code * 1000 } catch {}
          t += await viaContinuation(i)
          t += await stream(i % 5)
          _ = await counter.add(1)
          try? await Task.sleep(nanoseconds: UInt64(i % 3) * 1000)
          return t
        }
      }
      for await v in group { total &+= v }
    }
    let r = await recurse(6)
    let c = await counter.add(0)
    print("total", total, "recurse", r, "count", c)
  }
}
