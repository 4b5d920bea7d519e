;; GNU Shepherd service for the hauberk CI daemon.  Load it from your shepherd
;; configuration with (load "hauberk-ci.scm"), then `herd start hauberk-ci'.
;; `herd stop hauberk-ci' sends SIGTERM: children are killed and the database is left
;; consistent.
(define hauberk-ci
  (service
   '(hauberk-ci)
   #:documentation "Run the hauberk continuous-integration daemon."
   #:start (make-forkexec-constructor
            '("hauberk" "--store-dir" "/hauberk/store" "--state-dir" "/hauberk/var" "-v"
              "ci" "--specifications" "/etc/hauberk/specs.conf"
              "--interval" "300" "--max-jobs" "2")
            #:log-file "/var/log/hauberk-ci.log")
   #:stop (make-kill-destructor SIGTERM)
   #:respawn? #t))

(register-services (list hauberk-ci))
